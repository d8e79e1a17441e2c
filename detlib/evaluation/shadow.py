"""Shadow metrics: every regression loss measured on the same foreground RoIs, without backprop.

Runs that train with different losses can then be compared on one axis. The reference parameters
are fixed (smooth L1 beta = 1/9 as torchvision, Huber delta = 1) so the numbers mean the same in
every run, whatever loss that run trains with. Computed every ``log_period`` iterations only.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detlib import losses as L
from detlib.modeling.box_head import RoIBoxHead, Sampled

BETA, DELTA = 1 / 9, 1.0


@torch.no_grad()
def shadow_metrics(head: RoIBoxHead, deltas: Tensor, sampled: Sampled) -> dict[str, Tensor]:
    """Per foreground RoI means (sum over the 4 coordinates, averaged over RoIs), as 0-d tensors.

    Keys: ``shadow/{smooth_l1,huber,l1,l2,giou}``, ``shadow/{smooth_l1,huber}_quadratic_frac``
    (fraction of residuals inside the quadratic region) and ``train/fg_iou`` (mean IoU of decoded
    foreground boxes with their targets). Tensors stay on the device: no host sync here.
    """
    pred, target, props, gt = head.fg_predictions(deltas.detach(), sampled)
    n = max(pred.shape[0], 1)
    boxes = head.box_coder.decode_single(pred, props)
    residual = (pred - target).abs()
    iou = box_iou(boxes, gt).diagonal() if pred.shape[0] else pred.new_zeros(0)
    return {
        "shadow/smooth_l1": L.smooth_l1(pred, target, BETA, "sum") / n,
        "shadow/huber": L.huber(pred, target, DELTA, "sum") / n,
        "shadow/l1": L.l1(pred, target, "sum") / n,
        "shadow/l2": L.l2(pred, target, "sum") / n,
        "shadow/giou": L.giou_loss(boxes, gt, reduction="sum") / n,
        "shadow/smooth_l1_quadratic_frac": (residual < BETA).float().sum() / max(residual.numel(), 1),
        "shadow/huber_quadratic_frac": (residual <= DELTA).float().sum() / max(residual.numel(), 1),
        "train/fg_iou": iou.sum() / n,
    }
