"""Box-regression losses against torch.nn.functional, torchvision.ops and hand-computed values."""

from __future__ import annotations

import functools
import inspect
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection._utils import BoxCoder

from detlib import losses as L

REDUCTIONS = ["none", "sum", "mean"]


def _pair(n=64, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 4, generator=g, dtype=torch.float64) * scale).requires_grad_()
    y = torch.randn(n, 4, generator=g, dtype=torch.float64) * scale
    return x, y


def _value_and_grad(fn, x, y, **kw):
    x = x.detach().clone().requires_grad_()
    out = fn(x, y, **kw)
    out.sum().backward()
    return out.detach(), x.grad


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("ours,ref,kw", [
    (L.smooth_l1, F.smooth_l1_loss, {"beta": 1.0}),
    (L.smooth_l1, F.smooth_l1_loss, {"beta": 1 / 9}),
    (L.smooth_l1, F.smooth_l1_loss, {"beta": 0.0}),
    (L.huber, F.huber_loss, {"delta": 1.0}),
    (L.huber, F.huber_loss, {"delta": 0.5}),
    (L.l1, F.l1_loss, {}),
    (L.l2, F.mse_loss, {}),
])
def test_matches_torch_functional(ours, ref, kw, reduction):
    x, y = _pair()
    v, g = _value_and_grad(ours, x, y, reduction=reduction, **kw)
    rv, rg = _value_and_grad(ref, x, y, reduction=reduction, **kw)
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(g, rg)


def test_worked_values():
    # tf.keras documentation examples, mean reduction
    assert L.l1(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [0.0]])).item() == pytest.approx(1.0)
    assert L.l2(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0], [1.0]])).item() == pytest.approx(0.5)
    assert L.huber(torch.tensor([[0.6], [0.4]]), torch.tensor([[0.0], [1.0]])).item() == pytest.approx(0.18)
    yhat, y = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5]), torch.tensor([1.0, 1, 0, 1, 1])
    assert L.l1(yhat, y, reduction="sum").item() == pytest.approx(3.1)
    assert L.l2(yhat, y, reduction="sum").item() == pytest.approx(2.15)
    # smooth L1 by hand: beta=1: |x|=0.5 -> 0.125; |x|=2 -> 1.5
    assert L.smooth_l1(torch.tensor([0.5, 2.0]), torch.zeros(2), beta=1.0, reduction="none").tolist() == [0.125, 1.5]


@pytest.mark.parametrize("delta", [0.1, 0.5, 1.0, 2.0])
def test_huber_is_delta_times_smooth_l1(delta):
    x, y = _pair()
    torch.testing.assert_close(L.huber(x, y, delta=delta, reduction="none"),
                               delta * L.smooth_l1(x, y, beta=delta, reduction="none"))


def test_beta_zero_is_exactly_l1_with_finite_gradients():
    x, y = _pair()
    x.data[0, 0] = y[0, 0]  # a zero residual: the kink
    v, g = _value_and_grad(L.smooth_l1, x, y, beta=0.0, reduction="none")
    assert torch.equal(v, L.l1(x, y, reduction="none").detach())
    assert torch.isfinite(g).all()
    # the limit: small beta approaches L1
    assert torch.allclose(L.smooth_l1(x, y, beta=1e-4), L.l1(x, y), atol=1e-4)


def _alpha_iou(mode):
    fn = functools.partial(L.alpha_iou_loss, mode=mode)
    fn.__name__ = f"alpha_iou_loss[{mode}]"
    return fn


ALPHA_IOU = [_alpha_iou(m) for m in L.ALPHA_IOU_MODES]
BOX_LOSSES = [L.iou_loss, L.giou_loss, L.diou_loss, L.ciou_loss, L.eiou_loss, L.siou_loss, *ALPHA_IOU]
ALL = [L.smooth_l1, L.huber, L.l1, L.l2, L.balanced_l1, L.cauchy] + BOX_LOSSES


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input_is_zero_with_gradient(fn, reduction):
    x = torch.zeros(0, 4, requires_grad=True)
    out = fn(x, torch.zeros(0, 4), reduction=reduction)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == (0, 4)
    if reduction != "none":
        assert out.item() == 0.0


def _boxes(n, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=dtype) * 100
    wh = torch.rand(n, 2, generator=g, dtype=dtype) * 50 + 5
    return torch.cat([xy, xy + wh], 1)


@pytest.mark.parametrize("fn", BOX_LOSSES)
def test_identical_boxes_give_zero(fn):
    b = _boxes(32, 0)
    assert fn(b, b, reduction="none").abs().max().item() < 1e-6


@pytest.mark.parametrize("ours,ref", [
    ("giou_loss", "generalized_box_iou_loss"),
    ("diou_loss", "distance_box_iou_loss"),
    ("ciou_loss", "complete_box_iou_loss"),
])
def test_iou_family_matches_torchvision(ours, ref):
    import torchvision.ops as ops

    p, t = _boxes(200, 1), _boxes(200, 2)
    p[:50] = t[:50] + 0.5 * torch.randn(50, 4, dtype=torch.float64)  # overlapping (still valid) pairs
    assert (p[:, 2:] > p[:, :2]).all()
    v, g = _value_and_grad(getattr(L, ours), p, t, reduction="none")
    rv, rg = _value_and_grad(getattr(ops, ref), p, t, reduction="none")
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(g, rg)


def test_iou_loss_modes_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[0.0, 0, 10, 5]])  # IoU = 0.5
    assert L.iou_loss(a, b).item() == pytest.approx(0.5, abs=1e-6)
    assert L.iou_loss(a, b, mode="log").item() == pytest.approx(math.log(2), abs=1e-6)
    c = torch.tensor([[20.0, 0, 30, 10]])  # disjoint, enclosing 30x10, union 200 -> GIoU = 0 - 100/300
    assert L.giou_loss(a, c).item() == pytest.approx(1 + 100 / 300, abs=1e-6)


@pytest.mark.parametrize("fn", BOX_LOSSES)
def test_degenerate_predictions_stay_finite(fn):
    t = _boxes(6, 3, torch.float32)
    p = torch.tensor([[5.0, 5, 5, 5],        # zero area
                      [10.0, 10, 2, 3],      # inverted
                      [0.0, 0, 1e6, 1e6],    # huge
                      [-1e6, -1e6, 1e6, 1e6],
                      [3.0, 3, 3, 40],       # zero width
                      [1.0, 1, 2, 2]], requires_grad=True)
    out = fn(p, t, reduction="sum")
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(p.grad).all()


def test_huge_deltas_through_box_coder_stay_finite():
    from torchvision.models.detection._utils import BoxCoder

    coder = BoxCoder((10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(1000 / 16))
    props = _boxes(4, 4, torch.float32)
    deltas = torch.tensor([[1e4, -1e4, 1e4, 1e4], [0, 0, -1e4, -1e4], [1e3, 1e3, 50, -50], [0, 0, 0, 0.0]],
                          requires_grad=True)
    for fn in BOX_LOSSES:
        out = fn(coder.decode_single(deltas, props), props, reduction="sum")
        (g,) = torch.autograd.grad(out, deltas)
        assert torch.isfinite(out) and torch.isfinite(g).all(), fn.__name__
    for fn in (L.smooth_l1, L.huber, L.l1, L.l2, L.balanced_l1):
        out = fn(deltas, torch.zeros_like(deltas), reduction="sum")
        (g,) = torch.autograd.grad(out, deltas)
        assert torch.isfinite(out) and torch.isfinite(g).all(), fn.__name__


def test_balanced_l1_continuous_at_beta_and_matches_formula():
    for alpha, gamma, beta in [(0.5, 1.5, 1.0), (0.3, 2.0, 0.5)]:
        eps = 1e-6
        below = L.balanced_l1(torch.tensor([beta - eps]), torch.zeros(1), alpha, gamma, beta)
        above = L.balanced_l1(torch.tensor([beta + eps]), torch.zeros(1), alpha, gamma, beta)
        assert below.item() == pytest.approx(above.item(), abs=1e-4)
    # mmdetection's formula by hand at x = 0.5 (alpha 0.5, gamma 1.5, beta 1)
    b = math.e ** 3 - 1
    x = 0.5
    expected = 0.5 / b * (b * x + 1) * math.log(b * x + 1) - 0.5 * x
    assert L.balanced_l1(torch.tensor([x]), torch.zeros(1)).item() == pytest.approx(expected, rel=1e-5)
    assert L.balanced_l1(torch.tensor([2.0]), torch.zeros(1)).item() == pytest.approx(1.5 * 2 + 1.5 / b - 0.5, rel=1e-5)


# ---- property tests
residual = st.floats(-50, 50, allow_nan=False, allow_infinity=False)
positive = st.floats(0.01, 5.0)


def _grad(fn, x, **kw):
    t = torch.tensor([x], dtype=torch.float64, requires_grad=True)
    fn(t, torch.zeros(1, dtype=torch.float64), reduction="sum", **kw).backward()
    return t.grad.item()


@settings(max_examples=60, deadline=None)
@given(x=residual, beta=positive)
def test_properties_smooth_l1(x, beta):
    v = L.smooth_l1(torch.tensor([x]), torch.zeros(1), beta=beta).item()
    assert v >= 0
    assert abs(_grad(L.smooth_l1, x, beta=beta)) <= 1 + 1e-6


@settings(max_examples=60, deadline=None)
@given(x=residual, delta=positive)
def test_properties_huber(x, delta):
    assert L.huber(torch.tensor([x]), torch.zeros(1), delta=delta).item() >= 0
    assert abs(_grad(L.huber, x, delta=delta)) <= delta + 1e-6
    hv = L.huber(torch.tensor([x], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), delta=delta)
    sv = L.smooth_l1(torch.tensor([x], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), beta=delta)
    assert hv.item() == pytest.approx(delta * sv.item(), rel=1e-5, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(x=residual, s=st.floats(0.05, 5.0))
def test_scaling_moves_the_kink(x, s):
    xs = torch.tensor([x], dtype=torch.float64)
    z = torch.zeros(1, dtype=torch.float64)
    lhs = s * L.smooth_l1(xs / s, z, beta=1.0)
    rhs = L.smooth_l1(xs, z, beta=s)
    assert lhs.item() == pytest.approx(rhs.item(), rel=1e-5, abs=1e-6)


@settings(max_examples=40, deadline=None)
@given(param=positive)
def test_zero_at_zero_and_continuous_at_breakpoint(param):
    z = torch.zeros(1)
    for fn, kw in [(L.smooth_l1, {"beta": param}), (L.huber, {"delta": param}), (L.l1, {}), (L.l2, {}),
                   (L.balanced_l1, {"beta": param})]:
        assert fn(z, z, **kw).item() == 0.0
    for fn, kw in [(L.smooth_l1, {"beta": param}), (L.huber, {"delta": param}), (L.balanced_l1, {"beta": param})]:
        lo = fn(torch.tensor([param * (1 - 1e-7)], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), **kw)
        hi = fn(torch.tensor([param * (1 + 1e-7)], dtype=torch.float64), torch.zeros(1, dtype=torch.float64), **kw)
        assert lo.item() == pytest.approx(hi.item(), abs=1e-5)


def test_l2_gradient_grows_without_bound():
    grads = [abs(_grad(L.l2, x)) for x in (1.0, 10.0, 100.0, 1000.0)]
    assert grads == sorted(grads) and grads[-1] >= 2000 - 1e-6
    assert max(abs(_grad(L.smooth_l1, x)) for x in (1.0, 10.0, 100.0, 1000.0)) <= 1.0


@pytest.mark.parametrize("fn,kw", [(L.smooth_l1, {"beta": 0.7}), (L.huber, {"delta": 0.7}), (L.l2, {}),
                                   (L.balanced_l1, {}), (L.giou_loss, {}), (L.diou_loss, {}), (L.ciou_loss, {}),
                                   (L.eiou_loss, {}), (L.iou_loss, {}), (L.siou_loss, {}),
                                   *[(L.alpha_iou_loss, {"mode": m}) for m in L.ALPHA_IOU_MODES]])
def test_gradcheck_away_from_kinks(fn, kw):
    if fn in BOX_LOSSES:
        p = (_boxes(5, 7) + 0.3).requires_grad_()
        t = _boxes(5, 7)
    else:
        p = torch.tensor([[0.2, -0.3, 2.0, -3.0]], dtype=torch.float64, requires_grad=True)
        t = torch.zeros(1, 4, dtype=torch.float64)

    torch.autograd.gradcheck(lambda a: fn(a, t, reduction="sum", **kw), (p,))


@pytest.mark.parametrize("cls,kw,msg", [
    (L.SmoothL1, {"beta": -0.1}, "beta must be >= 0"),
    (L.Huber, {"delta": 0.0}, "delta must be > 0"),
    (L.Huber, {"delta": -1.0}, "delta must be > 0"),
    (L.L1, {"weight": -1.0}, "weight must be >= 0"),
    (L.IoULoss, {"mode": "square"}, "mode must be"),
    (L.SIoULoss, {"theta": 0.0}, "theta must be > 0"),
    (L.AlphaIoULoss, {"alpha": 0.0}, "alpha must be > 0"),
    (L.AlphaIoULoss, {"mode": "eiou"}, "mode must be one of iou|giou|diou|ciou"),
])
def test_bad_parameters_fail_at_construction(cls, kw, msg):
    with pytest.raises(ValueError, match=msg):
        cls(**kw)


def test_half_precision_inputs_compute_in_float32():
    x = torch.tensor([[300.0, -2.0, 0.5, 60000.0]], dtype=torch.float16)  # 60000^2 overflows fp16
    out = L.l2(x, torch.zeros_like(x))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert L.giou_loss(_boxes(3, 0).half(), _boxes(3, 1).half()).dtype == torch.float32


CODER = BoxCoder((10.0, 10.0, 5.0, 5.0))


def _anchored(n=16, seed=5):
    """Deltas, anchors and ground truth as a head passes them to its loss."""
    anchors, gt = _boxes(n, seed), _boxes(n, seed + 1)
    deltas = torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return deltas.requires_grad_(), anchors, gt


def test_modules_weight_and_space():
    deltas, anchors, gt = _anchored()
    target, boxes = CODER.encode_single(gt, anchors), CODER.decode_single(deltas, anchors)
    loss = L.Huber(delta=0.5, weight=2.0)(deltas, anchors, gt, CODER)
    assert loss.item() == pytest.approx(2 * L.huber(deltas, target, 0.5, "sum").item())  # encodes the targets
    loss = L.GIoULoss(weight=3.0)(deltas, anchors, gt, CODER)
    assert loss.item() == pytest.approx(3 * L.giou_loss(boxes, gt, reduction="sum").item())  # decodes the deltas
    per_box = L.IoULoss(mode="log")(deltas, anchors, gt, CODER, reduction="none")
    torch.testing.assert_close(per_box, 10 * L.iou_loss(boxes, gt, mode="log", reduction="none"))


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].joinpath("configs", "loss").glob("*.yaml")))
def test_each_loss_yaml_holds_its_constructors_defaults(path):
    """The constructor's signature is the schema and holds the defaults; the yaml lists them so that
    ``loss.beta=...`` is an override, and must not drift from them."""
    node = yaml.safe_load(path.read_text())
    cls = getattr(L, node.pop("_target_").rpartition(".")[2])
    defaults = {k: p.default for k, p in inspect.signature(cls).parameters.items()}
    assert node == defaults, path.name


@pytest.mark.parametrize("cls", [L.SmoothL1, L.Huber, L.L1, L.L2, L.BalancedL1, L.Cauchy, L.IoULoss, L.GIoULoss,
                                 L.DIoULoss, L.CIoULoss, L.EIoULoss, L.SIoULoss, L.AlphaIoULoss])
def test_perfect_prediction_gives_zero_and_empty_gives_zero_with_gradient(cls):
    deltas, anchors, gt = _anchored()
    perfect = CODER.encode_single(gt, anchors)
    assert cls()(perfect, anchors, gt, CODER).item() == pytest.approx(0.0, abs=1e-5)
    empty = torch.zeros(0, 4, dtype=torch.float64, requires_grad=True)
    out = cls()(empty, empty.detach(), empty.detach(), CODER, reduction="mean")
    out.backward()
    assert out.item() == 0.0 and empty.grad is not None


def test_cauchy_by_hand_and_its_redescending_gradient():
    c = 0.5
    x = torch.tensor([0.0, 0.5, 1.5, 5.0], dtype=torch.float64)
    z = torch.zeros(4, dtype=torch.float64)
    expected = [0.5 * c * c * math.log(1 + (v / c) ** 2) for v in x.tolist()]
    assert L.cauchy(x, z, scale=c, reduction="none").tolist() == pytest.approx(expected)
    _, g = _value_and_grad(L.cauchy, x, z, scale=c, reduction="none")
    assert g.tolist() == pytest.approx([v / (1 + (v / c) ** 2) for v in x.tolist()])
    assert g[1] == pytest.approx(c / 2) and g[3] < g[2] < g[1]  # peaks at |x| = c, then falls
    small = torch.tensor([1e-3], dtype=torch.float64)  # ~ x^2 / 2 near 0, as smooth L1 with beta 1
    assert L.cauchy(small, small * 0, reduction="sum").item() == pytest.approx(L.smooth_l1(small, small * 0, beta=1.0,
                                                                                           reduction="sum").item())
    with pytest.raises(ValueError, match="scale must be > 0"):
        L.Cauchy(scale=0.0)
    deltas, anchors, gt = _anchored()
    loss = L.Cauchy(scale=c, weight=2.0)(deltas, anchors, gt, CODER)
    assert loss.item() == pytest.approx(2 * L.cauchy(deltas, CODER.encode_single(gt, anchors), c, "sum").item())


# ---- SIoU (Gevorgyan 2022, arXiv 2205.12740), from the paper's equations


def _siou_by_the_paper(p, t, theta=4.0):
    """One pair of xyxy boxes, in plain floats, each cost as the paper writes it (arcsin form of the angle)."""
    (x1, y1, x2, y2), (a1, b1, a2, b2) = p, t
    inter = max(0.0, min(x2, a2) - max(x1, a1)) * max(0.0, min(y2, b2) - max(y1, b1))
    w, h, wg, hg = x2 - x1, y2 - y1, a2 - a1, b2 - b1
    iou = inter / (w * h + wg * hg - inter)
    c_w, c_h = (a1 + a2 - x1 - x2) / 2, (b1 + b2 - y1 - y2) / 2  # centre offset
    sigma = math.hypot(c_w, c_h)
    x = min(abs(c_w), abs(c_h)) / sigma if sigma else 0.0  # sin of the smaller angle to an axis (alpha or beta)
    angle = 1 - 2 * math.sin(math.asin(x) - math.pi / 4) ** 2
    gamma = 2 - angle
    rho_x = (c_w / (max(x2, a2) - min(x1, a1))) ** 2
    rho_y = (c_h / (max(y2, b2) - min(y1, b1))) ** 2
    distance = sum(1 - math.exp(-gamma * r) for r in (rho_x, rho_y))
    shape = sum((1 - math.exp(-abs(u - v) / max(u, v))) ** theta for u, v in ((w, wg), (h, hg)))
    return 1 - iou + (distance + shape) / 2


def test_siou_by_hand():
    p = torch.tensor([[0.0, 0, 2, 2]] * 4, dtype=torch.float64)
    t = torch.tensor([[1.0, 0, 3, 2],                     # along x: IoU 2/6, angle 0, gamma 2, rho_x (1/3)^2
                      [1.0, 1, 3, 3],                     # 45 deg: IoU 1/7, angle 1, gamma 1, rho_x = rho_y = 1/9
                      [3**0.5, 1, 3**0.5 + 2, 3],         # 30 deg: angle cos 30 = 3^0.5 / 2
                      [-1.0, 0, 3, 2]], dtype=torch.float64)  # concentric, twice as wide: IoU 1/2, omega_w 1/2
    r3 = 3**0.5
    gamma30 = 2 - r3 / 2
    expected = [
        1 - 1 / 3 + (1 - math.exp(-2 / 9)) / 2,
        1 - 1 / 7 + (2 - 2 * math.exp(-1 / 9)) / 2,
        1 - (2 - r3) / (6 + r3) + (2 - math.exp(-gamma30 * 3 / (r3 + 2) ** 2) - math.exp(-gamma30 / 9)) / 2,
        1 - 1 / 2 + (1 - math.exp(-0.5)) ** 4 / 2,
    ]
    got = L.siou_loss(p, t, reduction="none")
    assert got.tolist() == pytest.approx(expected, abs=1e-6)
    assert got.tolist() == pytest.approx([_siou_by_the_paper(a, b) for a, b in zip(p.tolist(), t.tolist())], abs=1e-6)
    # the paper's angle form equals sin(2 alpha): 1 - 2 sin^2(30 - 45 deg) = cos 30 deg
    assert 1 - 2 * math.sin(math.radians(-15)) ** 2 == pytest.approx(r3 / 2)


def test_siou_matches_the_paper_on_random_boxes_and_theta_is_the_shape_power():
    p, t = _boxes(40, 11), _boxes(40, 12)
    p[:20] = t[:20] + 2 * torch.randn(20, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert (p[:, 2:] > p[:, :2]).all()
    for theta in (4.0, 2.0):
        expected = [_siou_by_the_paper(a, b, theta) for a, b in zip(p.tolist(), t.tolist())]
        assert L.siou_loss(p, t, theta=theta, reduction="none").tolist() == pytest.approx(expected, abs=1e-6)
    loss = L.SIoULoss(theta=2.0, weight=3.0)
    deltas, anchors, gt = _anchored()
    assert loss(deltas, anchors, gt, CODER).item() == pytest.approx(
        3 * L.siou_loss(CODER.decode_single(deltas, anchors), gt, theta=2.0, reduction="sum").item())


# ---- Alpha-IoU (He et al. 2021, arXiv 2110.13675): 1 - IoU^alpha + P^alpha


def test_alpha_iou_by_hand():
    a, half = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, 10, 5]])  # IoU 1/2
    assert L.alpha_iou_loss(a, half).item() == pytest.approx(1 - 0.5**3, abs=1e-6)
    assert L.alpha_iou_loss(a, half, alpha=0.5).item() == pytest.approx(1 - 0.5**0.5, abs=1e-6)
    c = torch.tensor([[20.0, 0, 30, 10]])  # disjoint: IoU 0, enclosing 300, union 200: P = 1/3
    assert L.alpha_iou_loss(a, c, mode="giou").item() == pytest.approx(1 + (1 / 3) ** 3, abs=1e-6)
    p, t = torch.tensor([[0.0, 0, 2, 2]]), torch.tensor([[1.0, 0, 3, 2]])  # IoU 1/3, rho^2 1, c^2 = 3^2 + 2^2
    assert L.alpha_iou_loss(p, t, mode="diou").item() == pytest.approx(1 - (1 / 3) ** 3 + (1 / 13) ** 3, abs=1e-6)
    wide = torch.tensor([[0.0, 0, 4, 2]], dtype=torch.float64)  # IoU 4/8, rho^2 1, c^2 20, aspect 2 vs 1
    v = 4 / math.pi**2 * (math.atan(2) - math.atan(1)) ** 2
    beta = v / (1 - 0.5 + v)
    expected = 1 - 0.5**3 + (1 / 20) ** 3 + (beta * v) ** 3
    assert L.alpha_iou_loss(p.double(), wide, mode="ciou").item() == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("mode,plain", [("iou", L.iou_loss), ("giou", L.giou_loss), ("diou", L.diou_loss),
                                        ("ciou", L.ciou_loss)])
def test_alpha_one_is_the_plain_loss(mode, plain):
    p, t = _boxes(100, 21), _boxes(100, 22)
    p[:40] = t[:40] + 0.5 * torch.randn(40, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    v, g = _value_and_grad(functools.partial(L.alpha_iou_loss, alpha=1.0, mode=mode), p, t, reduction="none")
    rv, rg = _value_and_grad(plain, p, t, reduction="none")
    torch.testing.assert_close(v, rv)
    torch.testing.assert_close(g, rg)


def test_alpha_iou_up_weights_the_gradient_of_high_iou_boxes():
    """dL/dIoU = -alpha IoU^(alpha-1): with alpha 3 the gradient is 3 IoU^2 times the IoU loss's, so it grows
    with the IoU (0.75 at IoU 1/2, 2.43 at 0.9), the paper's reweighting towards accurate boxes."""
    target = torch.tensor([[0.0, 0, 10, 10]], dtype=torch.float64)
    for h, ratio in ((5.0, 0.75), (9.0, 3 * 0.81)):
        p = torch.tensor([[0.0, 0, 10, h]], dtype=torch.float64)  # IoU h / 10, d IoU / d y2 = 1 / 10
        _, g = _value_and_grad(L.alpha_iou_loss, p, target, reduction="sum")
        _, g1 = _value_and_grad(L.iou_loss, p, target, reduction="sum")
        assert g1[0, 3].item() == pytest.approx(-0.1)
        assert g[0, 3].item() == pytest.approx(-0.1 * ratio)


def test_alpha_below_one_stays_finite_at_zero_penalty_and_zero_iou():
    """alpha < 1: x^alpha has an infinite slope at 0 (identical boxes: penalty 0; disjoint: IoU 0)."""
    t = _boxes(3, 30)
    p = torch.cat([t[:1], t[1:2] + 200, t[2:] + 0.5]).requires_grad_()
    for mode in L.ALPHA_IOU_MODES:
        out = L.alpha_iou_loss(p, t, alpha=0.5, mode=mode, reduction="sum")
        (g,) = torch.autograd.grad(out, p)
        assert torch.isfinite(out) and torch.isfinite(g).all(), mode



# ---- KL loss (He et al. 2019, arXiv 1809.08545): exp(-alpha) smooth_l1(d, beta 1) + alpha / 2


def test_kl_loss_by_hand():
    """The paper's two branches, d = x_g - x_e, alpha = log sigma^2."""
    x = torch.tensor([[0.5, 0.5, 3.0, -1.0]], dtype=torch.float64)  # x_e; x_g = 0
    log_var = torch.tensor([[0.0, math.log(4), math.log(2), 0.0]], dtype=torch.float64)
    expected = [0.5**2 / 2,                                # |d| <= 1, sigma^2 1: smooth L1 (beta 1)
                0.25 * 0.5**2 / 2 + math.log(4) / 2,       # exp(-alpha) = 1/4
                0.5 * (3 - 0.5) + math.log(2) / 2,         # |d| > 1: exp(-alpha)(|d| - 1/2) + alpha / 2
                0.5]                                       # |d| = 1: both branches give 1/2
    got = L.kl_loss(x, torch.zeros_like(x), log_var, reduction="none")
    assert got[0].tolist() == pytest.approx(expected)
    x, log_var = x.clone().requires_grad_(), log_var.clone().requires_grad_()
    L.kl_loss(x, torch.zeros_like(x), log_var, reduction="sum").backward()
    # d/dx_e = exp(-alpha) * smooth_l1'(x_e), d/dalpha = 1/2 - exp(-alpha) * smooth_l1
    assert x.grad[0].tolist() == pytest.approx([0.5, 0.25 * 0.5, 0.5, -1.0])
    assert log_var.grad[0].tolist() == pytest.approx([0.5 - 0.125, 0.5 - 0.25 * 0.125, 0.5 - 0.5 * 2.5, 0.0])


def test_kl_loss_is_smooth_l1_at_unit_variance_and_learns_sigma_squared_as_the_error():
    x, y = _pair()
    zero = torch.zeros_like(y)
    torch.testing.assert_close(L.kl_loss(x, y, zero, reduction="none"), L.smooth_l1(x, y, beta=1.0, reduction="none"))
    # argmin over alpha: sigma^2 = d^2 for |d| <= 1 and 2|d| - 1 beyond (where d/dalpha = 0)
    d = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0], dtype=torch.float64)
    best = torch.log(torch.where(d <= 1, d**2, 2 * d - 1)).requires_grad_()
    L.kl_loss(d, torch.zeros_like(d), best, reduction="sum").backward()
    assert best.grad.abs().max().item() < 1e-12
    for shift in (-0.1, 0.1):  # and it is the minimum
        assert (L.kl_loss(d, 0 * d, best.detach() + shift, reduction="none")
                > L.kl_loss(d, 0 * d, best.detach(), reduction="none")).all()


def test_kl_loss_empty_and_extreme_inputs_stay_finite():
    for reduction in REDUCTIONS:
        x, a = torch.zeros(0, 4, requires_grad=True), torch.zeros(0, 4, requires_grad=True)
        out = L.kl_loss(x, torch.zeros(0, 4), a, reduction=reduction)
        out.sum().backward()
        assert torch.isfinite(out).all() and x.grad.shape == a.grad.shape == (0, 4)
    x = torch.tensor([[0.0, 1e4, -1e4, 0.3]], requires_grad=True)
    a = torch.tensor([[-50.0, 50.0, 0.0, -20.0]], requires_grad=True)  # sigma^2 from 2e-22 to 5e21
    out = L.kl_loss(x, torch.zeros(1, 4), a, reduction="sum")
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(x.grad).all() and torch.isfinite(a.grad).all()
    half = L.kl_loss(x.detach().half(), torch.zeros(1, 4).half(), a.detach().bfloat16())
    assert half.dtype == torch.float32 and torch.isfinite(half)
    with pytest.raises(ValueError, match="log_var shape"):
        L.kl_loss(x, torch.zeros(1, 4), torch.zeros(1, 3))


def test_kl_module_takes_deltas_and_log_variances_and_only_it_needs_them():
    deltas, anchors, gt = _anchored()
    log_var = torch.randn(deltas.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    target = CODER.encode_single(gt, anchors)
    loss = L.KLLoss(weight=2.0)
    assert loss(torch.cat([deltas, log_var], 1), anchors, gt, CODER).item() == pytest.approx(
        2 * L.kl_loss(deltas, target, log_var, reduction="sum").item())
    perfect = torch.cat([target, torch.zeros_like(target)], 1)
    assert loss(perfect, anchors, gt, CODER).item() == pytest.approx(0.0, abs=1e-9)  # sigma 1, no error
    empty = torch.zeros(0, 8, dtype=torch.float64, requires_grad=True)
    out = loss(empty, empty.detach()[:, :4], empty.detach()[:, :4], CODER, reduction="mean")
    out.backward()
    assert out.item() == 0.0 and empty.grad is not None
    with pytest.raises(ValueError, match=r"KLLoss takes \(N, 8\)"):
        loss(deltas, anchors, gt, CODER)
    assert L.KLLoss.needs_log_variance
    assert not any(c.needs_log_variance for c in (L.SmoothL1, L.L1, L.GIoULoss, L.SIoULoss, L.AlphaIoULoss))
