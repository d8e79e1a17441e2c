"""Box-regression diagnostics: what the trainer logs about the sampled RoIs, computed by the model.

Shadow metrics: every regression loss measured on the same foreground RoIs, without backprop, so
runs that train with different losses compare on one axis. The reference parameters are fixed
(smooth L1 beta = 1/9 as torchvision, Huber delta = 1) so the numbers mean the same in every run.
Everything is detached and stays on the device (no host sync); the trainer reads it on log steps.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import box_iou

from detlib import losses as L

BETA, DELTA = 1 / 9, 1.0


@torch.no_grad()
def regression_diagnostics(pred: Tensor, proposals: Tensor, gt: Tensor, box_coder: BoxCoder) -> dict[str, Tensor]:
    """``pred``: ``(F, 4)`` predicted deltas of the F foreground RoIs, ``proposals``/``gt``: ``(F, 4)`` xyxy
    their proposals and ground truth, ``box_coder`` the head's.

    0-d means per foreground RoI (sum over the 4 coordinates): ``train/shadow/{smooth_l1,huber,l1,l2,giou}``,
    ``train/shadow/{smooth_l1,huber}_quadratic_frac`` (fraction of residuals in the quadratic region) and
    ``train/fg_iou``, ``train/abs_residual_{p50,p90}`` (quantiles of ``|pred - target|`` over the 4F coordinates);
    1-d for histograms: ``train/residuals/{dx,dy,dw,dh}`` and ``train/fg_iou_hist``.
    """
    target, boxes = box_coder.encode_single(gt, proposals), box_coder.decode_single(pred, proposals)
    n = max(pred.shape[0], 1)
    residual = (pred - target).abs()
    iou = box_iou(boxes, gt).diagonal() if pred.shape[0] else pred.new_zeros(0)
    out = {
        "train/shadow/smooth_l1": L.smooth_l1(pred, target, BETA, "sum") / n,
        "train/shadow/huber": L.huber(pred, target, DELTA, "sum") / n,
        "train/shadow/l1": L.l1(pred, target, "sum") / n,
        "train/shadow/l2": L.l2(pred, target, "sum") / n,
        "train/shadow/giou": L.giou_loss(boxes, gt, reduction="sum") / n,
        "train/shadow/smooth_l1_quadratic_frac": (residual < BETA).float().sum() / max(residual.numel(), 1),
        "train/shadow/huber_quadratic_frac": (residual <= DELTA).float().sum() / max(residual.numel(), 1),
        "train/fg_iou": iou.sum() / n,
    }
    # Where the residuals sit, to hold against a loss's breakpoint (beta, delta): |residual| quantiles.
    q = torch.quantile(residual.flatten(), residual.new_tensor([0.5, 0.9])) if residual.numel() else residual.new_zeros(2)
    out["train/abs_residual_p50"], out["train/abs_residual_p90"] = q[0], q[1]
    if pred.shape[0]:
        out |= {f"train/residuals/{name}": (pred - target)[:, i] for i, name in enumerate(("dx", "dy", "dw", "dh"))}
        out["train/fg_iou_hist"] = iou
    return out
