"""Box-regression losses: functions in torch.nn.functional's style, and the modules configs instantiate.

Functions, two kinds:

* elementwise losses on encoded deltas ``(N, 4)`` (dx, dy, dw, dh): ``smooth_l1``, ``huber``, ``l1``,
  ``l2`` (torch.nn.functional's), ``balanced_l1``, ``cauchy``, and ``kl_loss``, which also takes the predicted
  log-variance of each delta;
* IoU-family losses on decoded boxes ``(N, 4)`` xyxy: ``giou_loss``, ``diou_loss`` (torchvision.ops'),
  ``iou_loss``, ``ciou_loss``, ``eiou_loss``, ``siou_loss``, ``alpha_iou_loss``; one value per box.

Every function takes ``reduction`` in ``none | sum | mean`` and adds what torch's lack: float32 under
autocast (half inputs are upcast), and ``mean`` of an empty input is 0 with a gradient (torch gives
NaN), so an image without foreground never poisons a batch.

Modules (``configs/loss/*.yaml`` name them with ``_target_``; the constructor's signature is the config's
schema): the box head and the RPN call every one the same way, ``loss(deltas, anchors, gt_boxes,
box_coder)``, and the loss decides its own space: it encodes the ground truth (``on_deltas``) or decodes
the prediction (``on_boxes``). No head knows which, so no flag (mmdetection's ``reg_decoded_bbox``) can be
forgotten.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder

Reduction = str  # "none" | "sum" | "mean"


def _reduce(loss: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        # sum() of an empty tensor is 0 and keeps the graph; dividing by max(n, 1) avoids 0/0.
        return loss.sum() / max(loss.numel(), 1)
    raise ValueError(f"reduction must be one of none|sum|mean, got {reduction!r}")


def _at_least_fp32(t: Tensor) -> Tensor:
    """Upcast half and bfloat16 (AMP) to float32; keep float32 and float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _pair(input: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Both in at least float32, after checking their shapes match (torch would broadcast)."""
    if input.shape != target.shape:
        raise ValueError(f"input and target shapes differ: {tuple(input.shape)} vs {tuple(target.shape)}")
    return _at_least_fp32(input), _at_least_fp32(target)


def _residual(input: Tensor, target: Tensor) -> Tensor:
    x, t = _pair(input, target)
    return x - t


def smooth_l1(input: Tensor, target: Tensor, beta: float = 1 / 9, reduction: Reduction = "mean") -> Tensor:
    """Smooth L1 (Fast R-CNN): ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta``.

    Gradient magnitude is bounded by 1. ``beta = 0`` is exactly L1. Default 1/9: torchvision's.
    """
    x, t = _pair(input, target)
    return _reduce(F.smooth_l1_loss(x, t, reduction="none", beta=beta), reduction)


def huber(input: Tensor, target: Tensor, delta: float = 1.0, reduction: Reduction = "mean") -> Tensor:
    """Huber: ``0.5 x^2`` if ``|x| <= delta`` else ``delta (|x| - 0.5 delta)``.

    Gradient magnitude is bounded by ``delta``; ``huber(delta) == delta * smooth_l1(beta=delta)``.
    """
    x, t = _pair(input, target)
    return _reduce(F.huber_loss(x, t, reduction="none", delta=delta), reduction)


def l1(input: Tensor, target: Tensor, reduction: Reduction = "mean") -> Tensor:
    """L1 (MAE): ``|x|``. Constant gradient magnitude, a kink at 0."""
    return _reduce(F.l1_loss(*_pair(input, target), reduction="none"), reduction)


def l2(input: Tensor, target: Tensor, reduction: Reduction = "mean") -> Tensor:
    """L2 (MSE): ``x^2``. Smooth, but the gradient ``2x`` grows with the error: outliers dominate."""
    return _reduce(F.mse_loss(*_pair(input, target), reduction="none"), reduction)


def balanced_l1(
    input: Tensor,
    target: Tensor,
    alpha: float = 0.5,
    gamma: float = 1.5,
    beta: float = 1.0,
    reduction: Reduction = "mean",
) -> Tensor:
    """Balanced L1 (Libra R-CNN, Pang et al. 2019), as mmdetection's ``balanced_l1_loss``.

    ``alpha/b (b|x|+1) ln(b|x|/beta + 1) - alpha|x|`` below ``beta``, ``gamma|x| + C`` above, with
    ``b = e^(gamma/alpha) - 1`` and ``C = gamma/b - alpha beta`` so the pieces meet at ``beta``.
    """
    x = _residual(input, target).abs()
    b = math.exp(gamma / alpha) - 1
    inner = alpha / b * (b * x + 1) * torch.log(b * x / beta + 1) - alpha * x
    outer = gamma * x + gamma / b - alpha * beta
    return _reduce(torch.where(x < beta, inner, outer), reduction)


def cauchy(input: Tensor, target: Tensor, scale: float = 1.0, reduction: Reduction = "mean") -> Tensor:
    """Cauchy (Lorentzian) robust loss: ``c^2/2 ln(1 + (x/c)^2)``, c = ``scale``.

    ``x^2/2`` near 0 (as smooth L1 with beta 1), but the gradient ``x / (1 + (x/c)^2)`` peaks at ``c/2`` for
    ``|x| = c`` and falls back to 0 beyond: gross errors are down-weighted, not merely capped as by smooth L1
    and Huber (a redescending M-estimator; scipy's ``least_squares(loss="cauchy", f_scale=c)`` cost).
    """
    c = scale
    return _reduce(0.5 * c * c * torch.log1p((_residual(input, target) / c) ** 2), reduction)


def kl_loss(input: Tensor, target: Tensor, log_var: Tensor, reduction: Reduction = "mean") -> Tensor:
    """KL loss (He et al., CVPR 2019, arXiv 1809.08545, "Bounding Box Regression with Uncertainty").

    The prediction is a Gaussian, mean ``input`` (x_e) and variance ``sigma^2 = exp(log_var)``; the target a
    Dirac delta at ``target`` (x_g). ``KL(Dirac || Gaussian) = d^2 / (2 sigma^2) + log(sigma^2) / 2`` plus
    constants, ``d = x_g - x_e``; with ``alpha = log_var`` and the paper's smooth-L1 form for ``|d| > 1``:
    ``exp(-alpha) d^2 / 2 + alpha / 2`` if ``|d| <= 1``, else ``exp(-alpha) (|d| - 1/2) + alpha / 2``,
    that is ``exp(-alpha) smooth_l1(d, beta=1) + alpha / 2``. ``alpha = 0`` (sigma 1) is smooth L1 with beta 1;
    minimising over alpha gives ``sigma^2 = d^2`` below 1 and ``2|d| - 1`` above: a confident prediction costs
    little when right, much when wrong. All three ``(N, 4)``; ``log_var`` gets its own gradient.
    """
    x, t = _pair(input, target)
    if log_var.shape != x.shape:
        raise ValueError(f"log_var shape {tuple(log_var.shape)} differs from the input's {tuple(x.shape)}")
    alpha = _at_least_fp32(log_var)
    return _reduce(torch.exp(-alpha) * F.smooth_l1_loss(x, t, reduction="none", beta=1.0) + alpha / 2, reduction)


# ---------------------------------------------------------------------------------------------
# IoU family, on decoded boxes (N, 4) xyxy. Computed in at least float32 (also under autocast).


def _box_pair(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    if pred.shape != target.shape or pred.shape[-1:] != (4,):
        raise ValueError(f"expected matching (N, 4) xyxy boxes, got {tuple(pred.shape)} and {tuple(target.shape)}")
    return _at_least_fp32(pred), _at_least_fp32(target)


def _box_terms(pred: Tensor, target: Tensor, eps: float) -> dict[str, Tensor]:
    """Shared geometry of two aligned box sets: IoU, enclosing box, centres, widths and heights."""
    pred, target = _box_pair(pred, target)
    x1, y1, x2, y2 = pred.unbind(-1)
    x1g, y1g, x2g, y2g = target.unbind(-1)
    # Inverted predictions count as zero-area (clamp) so that every term stays finite.
    wp, hp = (x2 - x1).clamp(min=0), (y2 - y1).clamp(min=0)
    wg, hg = (x2g - x1g).clamp(min=0), (y2g - y1g).clamp(min=0)
    iw = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0)
    ih = (torch.min(y2, y2g) - torch.max(y1, y1g)).clamp(min=0)
    inter = iw * ih
    union = wp * hp + wg * hg - inter
    iou = inter / (union + eps)
    cw = torch.max(x2, x2g) - torch.min(x1, x1g)  # enclosing box
    ch = torch.max(y2, y2g) - torch.min(y1, y1g)
    rho2 = ((x1 + x2 - x1g - x2g) ** 2 + (y1 + y2 - y1g - y2g) ** 2) / 4  # squared centre distance
    dx, dy = (x1g + x2g - x1 - x2) / 2, (y1g + y2g - y1 - y2) / 2  # centre offset, prediction to target
    return dict(iou=iou, union=union, cw=cw, ch=ch, rho2=rho2, dx=dx, dy=dy, wp=wp, hp=hp, wg=wg, hg=hg)


def iou_loss(
    input: Tensor, target: Tensor, mode: str = "linear", eps: float = 1e-7, reduction: Reduction = "mean"
) -> Tensor:
    """IoU loss: ``1 - IoU`` (``mode="linear"``) or ``-ln IoU`` (``mode="log"``, UnitBox)."""
    iou = _box_terms(input, target, eps)["iou"]
    if mode == "linear":
        loss = 1 - iou
    elif mode == "log":
        loss = -torch.log(iou.clamp(min=eps))
    else:
        raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
    return _reduce(loss, reduction)


def giou_loss(input: Tensor, target: Tensor, eps: float = 1e-7, reduction: Reduction = "mean") -> Tensor:
    """GIoU loss (Rezatofighi 2019): ``1 - IoU + |C - (A u B)| / |C|``, C the enclosing box (torchvision's)."""
    p, t = _box_pair(input, target)
    return _reduce(torchvision.ops.generalized_box_iou_loss(p, t, reduction="none", eps=eps), reduction)


def diou_loss(input: Tensor, target: Tensor, eps: float = 1e-7, reduction: Reduction = "mean") -> Tensor:
    """DIoU loss (Zheng 2020): ``1 - IoU + rho^2 / c^2``, c the enclosing box's diagonal (torchvision's)."""
    p, t = _box_pair(input, target)
    return _reduce(torchvision.ops.distance_box_iou_loss(p, t, reduction="none", eps=eps), reduction)


def ciou_loss(input: Tensor, target: Tensor, eps: float = 1e-7, reduction: Reduction = "mean") -> Tensor:
    """CIoU loss (Zheng 2020): DIoU plus ``alpha v``, v the aspect-ratio consistency term.

    Not torchvision's ``complete_box_iou_loss``: it divides by the predicted height, so a decoded box whose
    size underflows to 0 (a very negative dh) gives NaN; here widths and heights get an ``eps``.
    """
    t = _box_terms(input, target, eps)
    c2 = t["cw"] ** 2 + t["ch"] ** 2 + eps
    v = (4 / math.pi**2) * (torch.atan(t["wg"] / (t["hg"] + eps)) - torch.atan(t["wp"] / (t["hp"] + eps))) ** 2
    with torch.no_grad():  # alpha is a trade-off weight, not optimised (as in the paper and torchvision)
        alpha = v / (1 - t["iou"] + v + eps)
    return _reduce(1 - t["iou"] + t["rho2"] / c2 + alpha * v, reduction)


def eiou_loss(input: Tensor, target: Tensor, eps: float = 1e-7, reduction: Reduction = "mean") -> Tensor:
    """EIoU loss (Zhang 2022): DIoU plus separate width and height terms, ``dw^2/cw^2 + dh^2/ch^2``."""
    t = _box_terms(input, target, eps)
    c2 = t["cw"] ** 2 + t["ch"] ** 2 + eps
    dw2 = (t["wp"] - t["wg"]) ** 2 / (t["cw"] ** 2 + eps)
    dh2 = (t["hp"] - t["hg"]) ** 2 / (t["ch"] ** 2 + eps)
    return _reduce(1 - t["iou"] + t["rho2"] / c2 + dw2 + dh2, reduction)


def siou_loss(input: Tensor, target: Tensor, theta: float = 4.0, eps: float = 1e-7,
              reduction: Reduction = "mean") -> Tensor:
    """SIoU loss (Gevorgyan 2022, arXiv 2205.12740): ``1 - IoU + (Delta + Omega) / 2``.

    Angle cost ``Lambda = 1 - 2 sin^2(arcsin(c_h / sigma) - pi/4)`` with ``(c_w, c_h)`` the centre offset and
    ``sigma`` its length (``arcsin`` of the smaller of the two angles to the axes); equal to
    ``sin 2 alpha = 2 |c_w c_h| / sigma^2``, computed so: 0 along an axis, 1 at 45 degrees. Distance cost
    ``Delta = sum_{t=x,y} 1 - exp(-gamma rho_t)``, ``gamma = 2 - Lambda``, ``rho_x = (c_w / C_w)^2``,
    ``rho_y = (c_h / C_h)^2`` with ``C_w, C_h`` the enclosing box's sides. Shape cost
    ``Omega = sum_{t=w,h} (1 - exp(-omega_t))^theta``, ``omega_w = |w - w_gt| / max(w, w_gt)``, theta 4.

    mmdetection's ``siou_loss`` with ``neg_gamma=True`` (the paper's sign); its default ``neg_gamma=False``
    uses ``exp(+gamma rho)``, which makes ``Delta <= 0`` and rewards centre distance. Not clamped to
    mmdetection's ``[0, 2]``: far-off boxes keep a gradient (the loss is in ``[0, 3)``).
    """
    t = _box_terms(input, target, eps)
    dx, dy = t["dx"], t["dy"]
    angle = 2 * dx.abs() * dy.abs() / (dx**2 + dy**2 + eps)
    gamma = 2 - angle
    rho_x, rho_y = (dx / (t["cw"] + eps)) ** 2, (dy / (t["ch"] + eps)) ** 2
    distance = 2 - torch.exp(-gamma * rho_x) - torch.exp(-gamma * rho_y)
    omega_w = (t["wp"] - t["wg"]).abs() / (torch.max(t["wp"], t["wg"]) + eps)
    omega_h = (t["hp"] - t["hg"]).abs() / (torch.max(t["hp"], t["hg"]) + eps)
    shape = (1 - torch.exp(-omega_w)) ** theta + (1 - torch.exp(-omega_h)) ** theta
    return _reduce(1 - t["iou"] + (distance + shape) / 2, reduction)


def _power(x: Tensor, alpha: float, eps: float) -> Tensor:
    """``x ** alpha`` for ``x >= 0``; for ``alpha < 1``, whose gradient is infinite at 0, the gradient is that
    at ``eps`` below ``eps`` and 0 at 0."""
    if alpha >= 1:
        return x.clamp(min=0) ** alpha
    return torch.where(x > 0, x.clamp(min=eps) ** alpha, 0.0)


ALPHA_IOU_MODES = ("iou", "giou", "diou", "ciou")


def alpha_iou_loss(input: Tensor, target: Tensor, alpha: float = 3.0, mode: str = "iou", eps: float = 1e-7,
                   reduction: Reduction = "mean") -> Tensor:
    """Alpha-IoU loss (He et al., NeurIPS 2021, arXiv 2110.13675): ``1 - IoU^alpha + P^alpha``.

    The penalty ``P`` by ``mode``: ``iou`` none; ``giou`` ``|C - (A u B)| / |C|``; ``diou`` ``rho^2 / c^2``
    (so ``rho^(2 alpha) / c^(2 alpha)``); ``ciou`` that plus ``(beta v)^alpha``, beta and v as in ``ciou_loss``.
    ``alpha = 1`` is ``iou_loss``, ``giou_loss``, ``diou_loss`` and ``ciou_loss``. With ``alpha > 1`` the
    loss and gradient of high-IoU boxes grow relative to low-IoU ones (``dL/dIoU = -alpha IoU^(alpha-1)``);
    alpha 3 is the paper's choice. The paper's Box-Cox form ``(1 - IoU^alpha) / alpha`` differs by the factor.
    """
    if mode not in ALPHA_IOU_MODES:
        raise ValueError(f"mode must be one of {'|'.join(ALPHA_IOU_MODES)}, got {mode!r}")
    t = _box_terms(input, target, eps)
    loss = 1 - _power(t["iou"], alpha, eps)
    if mode == "giou":
        area_c = t["cw"] * t["ch"]
        loss = loss + _power((area_c - t["union"]) / (area_c + eps), alpha, eps)
    elif mode in ("diou", "ciou"):
        loss = loss + _power(t["rho2"] / (t["cw"] ** 2 + t["ch"] ** 2 + eps), alpha, eps)
    if mode == "ciou":
        v = (4 / math.pi**2) * (torch.atan(t["wg"] / (t["hg"] + eps)) - torch.atan(t["wp"] / (t["hp"] + eps))) ** 2
        with torch.no_grad():
            beta = v / (1 - t["iou"] + v + eps)
        loss = loss + _power(beta * v, alpha, eps)
    return _reduce(loss, reduction)


# ---------------------------------------------------------------------------------------------
# Modules that configs instantiate (configs/loss/*.yaml, for the box head and, as ``loss@rpn_loss``,
# the RPN). Each checks its parameters at construction (start-up) and picks its space in ``per_box``.

def on_deltas(fn: Callable[..., Tensor], deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, box_coder: BoxCoder,
              **params: float | str) -> Tensor:
    """``(N,)``: an elementwise ``fn`` of the predicted ``deltas`` and the encoded ground truth, summed over the
    4 coordinates. Encoding is exact; no gradient flows through it."""
    target = box_coder.encode_single(gt_boxes, anchors)
    return fn(deltas, target, reduction="none", **params).sum(-1)


def on_boxes(fn: Callable[..., Tensor], deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, box_coder: BoxCoder,
             **params: float | str) -> Tensor:
    """``(N,)``: a box ``fn`` of the predicted boxes (``deltas`` decoded against ``anchors``) and ``gt_boxes``."""
    return fn(box_coder.decode_single(deltas, anchors), gt_boxes, reduction="none", **params)


def _check(name: str, value: float, ok: bool, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:
        raise ValueError(f"{name} {rule}, got {value!r}")
    return float(value)


def _num(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class BoxLoss(nn.Module):
    """A weighted box-regression loss, called the same way by the box head and the RPN.

    ``forward(deltas, anchors, gt_boxes, box_coder, reduction="sum")``: ``deltas (N, 4)`` predicted offsets
    from ``anchors (N, 4)`` xyxy (the head's proposals or the RPN's anchors), ``gt_boxes (N, 4)`` xyxy their
    matched ground truth, ``box_coder`` torchvision's ``BoxCoder``. Returns ``weight`` times the reduced
    per-box loss (``(N,)`` with ``"none"``). A subclass sets its parameters in ``__init__`` (its signature
    is the config schema) and says its space in ``per_box`` with ``on_deltas`` or ``on_boxes``.

    ``needs_log_variance``: the loss also takes a predicted log-variance per coordinate, so ``deltas`` is
    ``(N, 8)``, the 4 deltas then their 4 log-variances. The box head reads it to add that output; the RPN,
    whose head predicts none, refuses such a loss.
    """

    needs_log_variance: bool = False

    def __init__(self, weight: float = 1.0, **params: float | str) -> None:
        super().__init__()
        self.weight = _check("weight", weight, _num(weight) and weight >= 0, "must be >= 0")
        self.params = params

    def per_box(self, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, box_coder: BoxCoder) -> Tensor:
        raise NotImplementedError

    def forward(self, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, box_coder: BoxCoder,
                reduction: Reduction = "sum") -> Tensor:
        return self.weight * _reduce(self.per_box(deltas, anchors, gt_boxes, box_coder), reduction)

    def extra_repr(self) -> str:
        return ", ".join([f"weight={self.weight}"] + [f"{k}={v}" for k, v in self.params.items()])


class SmoothL1(BoxLoss):
    def __init__(self, beta: float = 1 / 9, weight: float = 1.0) -> None:
        super().__init__(weight, beta=_check("beta", beta, _num(beta) and beta >= 0, "must be >= 0"))

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_deltas(smooth_l1, *args, **self.params)


class Huber(BoxLoss):
    def __init__(self, delta: float = 1.0, weight: float = 1.0) -> None:
        super().__init__(weight, delta=_check("delta", delta, _num(delta) and delta > 0, "must be > 0"))

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_deltas(huber, *args, **self.params)


class L1(BoxLoss):
    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_deltas(l1, *args)


class L2(BoxLoss):
    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_deltas(l2, *args)


class BalancedL1(BoxLoss):
    def __init__(self, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0, weight: float = 1.0) -> None:
        super().__init__(
            weight,
            alpha=_check("alpha", alpha, _num(alpha) and alpha > 0, "must be > 0"),
            gamma=_check("gamma", gamma, _num(gamma) and gamma > 0, "must be > 0"),
            beta=_check("beta", beta, _num(beta) and beta > 0, "must be > 0"),
        )

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_deltas(balanced_l1, *args, **self.params)


class IoULoss(BoxLoss):
    def __init__(self, mode: str = "linear", weight: float = 10.0) -> None:
        if mode not in ("linear", "log"):
            raise ValueError(f"mode must be 'linear' or 'log', got {mode!r}")
        super().__init__(weight, mode=mode)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_boxes(iou_loss, *args, **self.params)


class GIoULoss(BoxLoss):
    def __init__(self, weight: float = 10.0) -> None:  # 10: the weight GIoU's authors and mmdetection use
        super().__init__(weight)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_boxes(giou_loss, *args)


class DIoULoss(BoxLoss):
    def __init__(self, weight: float = 10.0) -> None:
        super().__init__(weight)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_boxes(diou_loss, *args)


class CIoULoss(BoxLoss):
    def __init__(self, weight: float = 12.0) -> None:  # 12: mmdetection's Faster R-CNN CIoU config
        super().__init__(weight)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_boxes(ciou_loss, *args)


class EIoULoss(BoxLoss):
    def __init__(self, weight: float = 12.0) -> None:
        super().__init__(weight)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_boxes(eiou_loss, *args)


class SIoULoss(BoxLoss):
    def __init__(self, theta: float = 4.0, weight: float = 10.0) -> None:  # 10: as GIoU and DIoU
        super().__init__(weight, theta=_check("theta", theta, _num(theta) and theta > 0, "must be > 0"))

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_boxes(siou_loss, *args, **self.params)


class AlphaIoULoss(BoxLoss):
    def __init__(self, alpha: float = 3.0, mode: str = "iou", weight: float = 10.0) -> None:  # 10: as IoULoss
        if mode not in ALPHA_IOU_MODES:
            raise ValueError(f"mode must be one of {'|'.join(ALPHA_IOU_MODES)}, got {mode!r}")
        super().__init__(weight, alpha=_check("alpha", alpha, _num(alpha) and alpha > 0, "must be > 0"), mode=mode)

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_boxes(alpha_iou_loss, *args, **self.params)


class KLLoss(BoxLoss):
    """``kl_loss`` on the encoded deltas; ``deltas (N, 8)``: the box head's 4 deltas and 4 log-variances."""

    needs_log_variance = True

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__(weight)

    def per_box(self, deltas: Tensor, anchors: Tensor, gt_boxes: Tensor, box_coder: BoxCoder) -> Tensor:
        if deltas.shape[-1:] != (8,):
            raise ValueError(f"KLLoss takes (N, 8) predictions (4 deltas, 4 log-variances), got {tuple(deltas.shape)}")
        target = box_coder.encode_single(gt_boxes, anchors)
        return kl_loss(deltas[:, :4], target, deltas[:, 4:], reduction="none").sum(-1)


class Cauchy(BoxLoss):
    def __init__(self, scale: float = 1.0, weight: float = 1.0) -> None:
        super().__init__(weight, scale=_check("scale", scale, _num(scale) and scale > 0, "must be > 0"))

    def per_box(self, *args: Tensor | BoxCoder) -> Tensor:
        return on_deltas(cauchy, *args, **self.params)
