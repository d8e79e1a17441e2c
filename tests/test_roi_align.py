"""The gather RoIAlign equals torchvision's kernel, forward and gradients, single- and multi-level."""

from collections import OrderedDict

import pytest
import torch
import torchvision

from detlib.modeling.roi_align import MultiScaleRoIAlign, roi_align


def _rois(k: int = 40, images: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    b = torch.randint(0, images, (k,), generator=g).float()
    xy = torch.rand(k, 2, generator=g) * 24 - 4
    rois = torch.cat([b[:, None], xy, xy + torch.rand(k, 2, generator=g) * 20], 1)
    rois[0, 1:] = 0.0  # empty box
    rois[1, 1:] = torch.tensor([-10.0, -10.0, -2.0, -3.0])  # wholly outside the map (top left)
    rois[2, 1:] = torch.tensor([16.0, 12.0, 40.0, 30.0])  # across the bottom-right border
    rois[3, 1:] = torch.tensor([0.0, 0.0, 17 / 0.8, 13 / 0.8])  # exactly the whole map at scale 0.8
    rois[4, 1:] = torch.tensor([5.0, 5.0, 5.5, 5.2])  # smaller than a cell
    return rois


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [1, 2, 3, 0, -1])
def test_equals_torchvision_forward_and_gradients(aligned, sampling_ratio):
    x = torch.randn(3, 5, 13, 17, generator=torch.Generator().manual_seed(1), requires_grad=True)
    rois = _rois()
    ref = torchvision.ops.roi_align(x, rois, (7, 6), 0.8, sampling_ratio, aligned)
    out = roi_align(x, rois, (7, 6), 0.8, sampling_ratio, aligned)
    assert out.shape == ref.shape == (40, 5, 7, 6) and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.autograd.grad((out * g).sum(), x)[0], torch.autograd.grad((ref * g).sum(), x)[0],
                               rtol=1e-5, atol=1e-5)


def test_boxes_as_a_list_and_channels_last_input():
    x = torch.randn(2, 4, 9, 11).contiguous(memory_format=torch.channels_last)
    boxes = [torch.tensor([[1.0, 1.0, 6.0, 7.0]]), torch.tensor([[0.0, 2.0, 10.0, 8.0], [3.0, 3.0, 4.0, 4.0]])]
    torch.testing.assert_close(roi_align(x, boxes, 3, 1.0, 2), torchvision.ops.roi_align(x, boxes, 3, 1.0, 2),
                               rtol=1e-5, atol=1e-5)


def _pyramid(dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    return OrderedDict((name, torch.randn(2, 8, 64 // s, 48 // s, generator=g).to(dtype).requires_grad_())
                       for name, s in (("0", 4), ("1", 8), ("2", 16), ("pool", 32)))


def _boxes():
    g = torch.Generator().manual_seed(4)
    out = []
    for k in (30, 17):
        xy = torch.rand(k, 2, generator=g) * torch.tensor([40.0, 56.0])
        fixed = torch.tensor([[1.0, 1.0, 9.0, 9.0], [4.0, 4.0, 44.0, 44.0], [0.0, 0.0, 47.0, 63.0]])  # each level
        out.append(torch.cat([torch.cat([xy, xy + 2 + torch.rand(k, 2, generator=g) * 60], 1), fixed]))
    return out


@pytest.mark.parametrize("sampling_ratio", [2, 0])
def test_multiscale_equals_torchvision_pooler(sampling_ratio):
    feats, boxes, sizes = _pyramid(), _boxes(), [(64, 48), (60, 40)]
    kw = dict(canonical_scale=16, canonical_level=3)
    ref_pool = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2"], 7, sampling_ratio, **kw)
    ref = ref_pool(feats, boxes, sizes)
    levels = ref_pool.map_levels(boxes)
    assert len(set(levels.tolist())) == 3  # every level is used
    out = MultiScaleRoIAlign(["0", "1", "2"], 7, sampling_ratio, impl="gather", **kw)(feats, boxes, sizes)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5))
    maps = [feats[k] for k in ("0", "1", "2")]
    for a, b in zip(torch.autograd.grad((out * g).sum(), maps), torch.autograd.grad((ref * g).sum(), maps)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_features_under_autocast_sample_in_float32():
    """bf16 maps give a bf16 result, as torchvision's pooler, computed from the maps in float32."""
    feats, boxes, sizes = _pyramid(torch.bfloat16), _boxes(), [(64, 48), (60, 40)]
    pool = MultiScaleRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=32, canonical_level=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pool(feats, boxes, sizes)
    ref = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=32, canonical_level=3)(
        {k: v.float() for k, v in feats.items()}, boxes, sizes)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref.bfloat16())  # rounded once, at the end (ties may round either way)
    out.float().sum().backward()
    assert feats["0"].grad.dtype == torch.bfloat16


def test_no_boxes_still_backprops_and_results_are_deterministic():
    feats = _pyramid()
    pool = MultiScaleRoIAlign(["0", "1", "2"], 7, 2, canonical_scale=32, canonical_level=3)
    empty = pool(feats, [torch.zeros(0, 4), torch.zeros(0, 4)], [(64, 48), (64, 48)])
    assert empty.shape == (0, 8, 7, 7)
    empty.sum().backward()
    grads = []
    for _ in range(2):  # resume is bit-exact only if the backward is
        out = pool(feats, _boxes(), [(64, 48), (60, 40)])
        grads.append(torch.autograd.grad(out.square().sum(), feats["0"])[0])
    assert torch.equal(grads[0], grads[1])


def test_repr_and_bad_impl():
    assert "impl='auto'" in repr(MultiScaleRoIAlign(["0"], 7, 2))
    with pytest.raises(ValueError, match="impl"):
        MultiScaleRoIAlign(["0"], 7, 2, impl="fast")
