"""The RoI box head: box coding, sampling, loss normalisation and the box-space decode path."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import MultiScaleRoIAlign

from detlib import losses as L
from detlib.modeling.box_head import RoIBoxHead, Sampled, corrupt_targets


def test_box_coder_round_trip():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0), bbox_xform_clip=math.log(1000 / 16))
    g = torch.Generator().manual_seed(0)
    props = torch.rand(50, 2, generator=g) * 100
    props = torch.cat([props, props + torch.rand(50, 2, generator=g) * 60 + 2], 1)
    gt = props + torch.randn(50, 4, generator=g) * 3
    gt[:, 2:] = torch.maximum(gt[:, 2:], gt[:, :2] + 1)
    deltas = coder.encode_single(gt, props)
    torch.testing.assert_close(coder.decode_single(deltas, props), gt, atol=1e-3, rtol=1e-5)


def _head(loss, num_classes=3):
    roi = MultiScaleRoIAlign(["0"], 7, 2)
    return RoIBoxHead(roi, 8, num_classes, loss, hidden=16, batch_size_per_image=16)


def _sampled():
    props = torch.tensor([[0.0, 0, 10, 10], [5, 5, 20, 20], [30, 30, 40, 40], [0, 0, 50, 50]])
    gt = torch.tensor([[1.0, 1, 11, 11], [6, 4, 21, 19], [30, 30, 40, 40], [0, 0, 1, 1]])
    labels = torch.tensor([1, 2, 0, 0])
    return Sampled(props, labels, gt, [props])


@pytest.mark.parametrize("loss", [L.SmoothL1(beta=1 / 9), L.L1(), L.L2(), L.Huber(0.5), L.BalancedL1()])
def test_delta_loss_covers_foreground_of_gt_class_divided_by_all_sampled(loss):
    head = _head(loss)
    s = _sampled()
    target = head.box_coder.encode_single(s.gt_boxes, s.proposals)
    deltas = torch.randn(4, 3 * 4)
    losses = head.losses(torch.randn(4, 3), deltas, s)
    fg = [0, 1]
    pred = torch.stack([deltas.view(4, 3, 4)[i, s.labels[i]] for i in fg])
    expected = loss.weight * loss.per_box(pred, s.proposals[fg], s.gt_boxes[fg], head.box_coder).sum() / 4
    # normaliser: all 4 sampled RoIs, not the 2 foregrounds; the loss saw deltas against the encoded targets
    fn = {"SmoothL1": L.smooth_l1, "L1": L.l1, "L2": L.l2, "Huber": L.huber, "BalancedL1": L.balanced_l1}
    by_hand = fn[type(loss).__name__](pred, target[fg], reduction="sum", **loss.params) / 4
    torch.testing.assert_close(expected, by_hand)
    torch.testing.assert_close(losses["loss_box_reg"], expected)


def test_perfect_deltas_give_zero_box_loss_in_both_spaces():
    s = _sampled()
    for loss in (L.SmoothL1(beta=0.0), L.GIoULoss(), L.CIoULoss()):
        head = _head(loss)
        target = head.box_coder.encode_single(s.gt_boxes, s.proposals)
        deltas = torch.zeros(4, 3, 4)
        deltas[torch.arange(4), s.labels] = target
        out = head.losses(torch.randn(4, 3), deltas.view(4, 12), s)["loss_box_reg"]
        assert out.item() == pytest.approx(0.0, abs=1e-5), type(loss).__name__


def test_box_space_loss_decodes_against_proposals():
    head = _head(L.GIoULoss(weight=1.0))
    s = _sampled()
    deltas = torch.randn(4, 12) * 0.1
    pred_d = deltas.view(4, 3, 4)[[0, 1], s.labels[[0, 1]]]
    boxes = head.box_coder.decode_single(pred_d, s.proposals[[0, 1]])
    expected = L.giou_loss(boxes, s.gt_boxes[[0, 1]], reduction="sum") / 4
    torch.testing.assert_close(head.losses(torch.randn(4, 3), deltas, s)["loss_box_reg"], expected)


@pytest.mark.parametrize("loss", [L.SmoothL1(), L.GIoULoss()])
def test_no_foreground_gives_zero_loss_with_gradient(loss):
    head = _head(loss)
    s = Sampled(torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]), torch.zeros(1, 4), [])
    deltas = torch.randn(1, 12, requires_grad=True)
    out = head.losses(torch.randn(1, 3), deltas, s)["loss_box_reg"]
    out.backward()
    assert out.item() == 0.0 and deltas.grad is not None and torch.isfinite(deltas.grad).all()


def test_sample_matches_and_samples():
    head = _head(L.L1())
    props = [torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60], [1, 1, 11, 11]])]
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}]
    s = head.sample(props, targets)
    assert s.proposals.shape[0] == s.labels.shape[0] == s.gt_boxes.shape[0]
    fg = s.labels > 0
    assert (s.labels[fg] == 2).all() and fg.sum() >= 2  # the GT itself is added as a proposal
    empty = head.sample(props, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}])
    assert (empty.labels == 0).all()


def test_corrupt_targets_makes_gross_errors_at_the_given_rate():
    from torchvision.ops import box_iou

    torch.manual_seed(0)
    xy = torch.rand(20000, 2) * 100
    gt = torch.cat([xy, xy + torch.rand(20000, 2) * 50 + 5], 1)
    assert torch.equal(corrupt_targets(gt, 0.0), gt)
    out = corrupt_targets(gt, 0.3)
    changed = (out != gt).any(1)
    assert changed.float().mean().item() == pytest.approx(0.3, abs=0.01)
    iou = box_iou(out[changed], gt[changed]).diagonal()
    assert iou.max().item() <= 1 / 9 + 1e-5  # every corrupted target is a gross error
    assert ((out[:, 2:] - out[:, :2]) > 0).all()


def test_target_outliers_change_the_regression_target_only():
    """Matching, sampling and classification see the clean box; only loss_box_reg moves, and only in training."""
    torch.manual_seed(0)
    props = [torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 9, 11], [50, 50, 60, 60], [2, 0, 12, 10]])]
    targets = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}]
    logits, deltas = torch.randn(6, 3), torch.randn(6, 12) * 0.1
    clean, noisy = _head(L.SmoothL1()), _head(L.SmoothL1())
    noisy.target_outliers = 1.0
    out = {}
    for name, head in (("clean", clean), ("noisy", noisy)):
        torch.manual_seed(1)
        s = head.sample(props, targets)
        out[name] = (s, head.losses(logits[: s.labels.numel()], deltas[: s.labels.numel()], s))
    (s0, l0), (s1, l1) = out["clean"], out["noisy"]
    assert torch.equal(s0.labels, s1.labels) and torch.equal(s0.gt_boxes, s1.gt_boxes)
    assert torch.equal(s0.proposals, s1.proposals)
    assert l1["loss_cls"] == l0["loss_cls"] and l1["loss_box_reg"] > 2 * l0["loss_box_reg"]
    noisy.eval()  # validation loss stays clean
    n = s0.labels.numel()
    assert noisy.losses(logits[:n], deltas[:n], s0)["loss_box_reg"] == l0["loss_box_reg"]
    with pytest.raises(ValueError, match="target_outliers must be in"):
        RoIBoxHead(MultiScaleRoIAlign(["0"], 7, 2), 8, 3, L.L1(), target_outliers=1.5)


# ---- the log-variance output (KL loss, He et al. 2019) and variance voting


def test_only_a_loss_that_needs_log_variances_adds_their_layer_and_the_rest_is_unchanged():
    """The plain head's parameters and random draws are those of a head before the option existed: the layer is
    created last and only for KLLoss; its start is sigma^2 ~ 1 (weights N(0, 1e-4), bias 0)."""
    torch.manual_seed(0)
    plain = _head(L.SmoothL1())
    torch.manual_seed(0)
    kl = _head(L.KLLoss())
    assert plain.bbox_log_var is None and plain.box_dim == 4
    assert [k for k in plain.state_dict() if "bbox_log_var" in k] == []
    extra = set(kl.state_dict()) - set(plain.state_dict())
    assert extra == {"bbox_log_var.weight", "bbox_log_var.bias"} and kl.bbox_log_var.out_features == 3 * 4
    for k, v in plain.state_dict().items():
        assert torch.equal(v, kl.state_dict()[k]), k
    assert kl.bbox_log_var.weight.std().item() == pytest.approx(1e-4, rel=0.1)
    assert torch.equal(kl.bbox_log_var.bias, torch.zeros(12))
    features = {"0": torch.randn(2, 8, 16, 16)}
    props = [torch.tensor([[0.0, 0, 8, 8], [2, 2, 14, 10]])]
    logits, deltas = plain(features, props, [(16, 16)])
    kl_logits, kl_out = kl(features, props, [(16, 16)])
    assert deltas.shape == (2, 12) and kl_out.shape == (2, 24) and torch.equal(logits, kl_logits)
    per_class = kl_out.view(2, 3, 8)
    assert torch.equal(per_class[..., :4].reshape(2, 12), deltas)  # the same deltas, then the log-variances
    assert per_class[..., 4:].abs().max().item() < 1e-2


def test_kl_box_loss_sees_the_gt_class_deltas_and_log_variances():
    loss = L.KLLoss()
    head = _head(loss)
    s = _sampled()
    out = torch.randn(4, 3 * 8)
    losses = head.losses(torch.randn(4, 3), out, s)
    fg = [0, 1]
    pred = out.view(4, 3, 8)[fg, s.labels[fg]]
    target = head.box_coder.encode_single(s.gt_boxes[fg], s.proposals[fg])
    by_hand = L.kl_loss(pred[:, :4], target, pred[:, 4:], reduction="sum") / 4  # over all 4 sampled RoIs
    torch.testing.assert_close(losses["loss_box_reg"], by_hand)
    diag = head.diagnostics(out, s, full=True)
    assert diag["train/box_log_var"].item() == pytest.approx(pred[:, 4:].mean().item())
    assert diag["train/shadow/l1"].item() == pytest.approx(L.l1(pred[:, :4], target, "sum").item() / 2)


def test_variance_voting_by_hand():
    """Algorithm 1 of He et al. 2019 on one kept box A and its candidates: B overlaps it (IoU 5/6), C is another
    class, D does not overlap; the weights are p / sigma^2, p = exp(-(1 - IoU)^2 / sigma_t)."""
    from detlib.modeling.box_head import variance_voting

    a, b = [0.0, 0, 10, 10], [0.0, 0, 10, 12]
    cand = torch.tensor([a, b, [0.0, 0, 10, 11], [50.0, 50, 60, 60]], dtype=torch.float64)
    labels = torch.tensor([1, 1, 2, 1])
    var = torch.ones(4, 4, dtype=torch.float64)
    voted = variance_voting(cand[:1], labels[:1], cand, labels, var, sigma_t=0.02)
    p = math.exp(-((1 - 5 / 6) ** 2) / 0.02)
    cy = (5 + 6 * p) / (1 + p)
    h = math.exp((math.log(10) + p * math.log(12)) / (1 + p))
    assert voted[0].tolist() == pytest.approx([0, cy - h / 2, 10, cy + h / 2])
    var[1, 1], var[1, 3] = 1e-9, 1e-9  # B is certain of its centre y and height: A takes them
    voted = variance_voting(cand[:1], labels[:1], cand, labels, var)
    assert voted[0].tolist() == pytest.approx(b, abs=1e-5)
    assert variance_voting(cand[:0], labels[:0], cand, labels, var).shape == (0, 4)


def test_postprocess_with_variance_voting_keeps_scores_and_labels():
    head = _head(L.KLLoss())
    torch.manual_seed(0)
    props = [torch.rand(30, 2) * 40, torch.rand(5, 2) * 40]
    props = [torch.cat([p, p + torch.rand(p.shape[0], 2) * 20 + 4], 1) for p in props]
    logits, out = torch.randn(35, 3) * 3, torch.randn(35, 24) * 0.3
    plain = head.postprocess(logits, out, props, [(64, 64)] * 2)
    head.variance_voting = True
    voted = head.postprocess(logits, out, props, [(64, 64)] * 2)
    for d0, d1 in zip(plain, voted):
        assert torch.equal(d0["scores"], d1["scores"]) and torch.equal(d0["labels"], d1["labels"])
        assert torch.isfinite(d1["boxes"]).all()
    assert any(not torch.allclose(d0["boxes"], d1["boxes"]) for d0, d1 in zip(plain, voted))
    head.voting_sigma_t = 1e-9  # no neighbour counts: each kept box stays itself
    for d0, d1 in zip(plain, head.postprocess(logits, out, props, [(64, 64)] * 2)):
        torch.testing.assert_close(d0["boxes"], d1["boxes"], atol=1e-4, rtol=1e-5)
    out[:, 4:] = 1e4  # absurd log-variances: clamped, still finite
    assert all(torch.isfinite(d["boxes"]).all() for d in head.postprocess(logits, out, props, [(64, 64)] * 2))


def test_variance_voting_and_the_rpn_refuse_a_head_without_log_variances():
    from detlib.engine.build import build_model

    from .conftest import compose_cfg

    with pytest.raises(ValueError, match="variance_voting needs a loss that predicts a log-variance"):
        RoIBoxHead(MultiScaleRoIAlign(["0"], 7, 2), 8, 3, L.SmoothL1(), variance_voting=True)
    with pytest.raises(ValueError, match="voting_sigma_t must be > 0"):
        RoIBoxHead(MultiScaleRoIAlign(["0"], 7, 2), 8, 3, L.KLLoss(), voting_sigma_t=0.0)
    with pytest.raises(Exception, match="rpn_loss: KLLoss needs a predicted log-variance"):
        build_model(compose_cfg("loss@rpn_loss=kl"), 3)
    model = build_model(compose_cfg("loss=kl", "model.roi_head.variance_voting=true"), 3)
    assert model.roi_head.variance_voting and model.roi_head.box_dim == 8
