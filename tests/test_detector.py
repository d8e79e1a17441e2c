"""The detector's resize: min/max size from the model config, multi-scale training sizes, mode switch."""

from __future__ import annotations

import pytest
import torch

from detlib.engine.build import build_model
from detlib.modeling.detector import FasterRCNN

from .conftest import compose_cfg


def _model(*overrides):
    cfg = compose_cfg(*overrides)
    return build_model(cfg, 3)


def test_multi_scale_training_sizes_and_the_last_size_for_eval():
    model = _model("model.min_size=[48,64]", "model.max_size=200")
    assert model.min_size == (48, 64) and model.max_size == 200
    image = torch.rand(3, 32, 40)
    torch.manual_seed(0)
    seen = {model.transform([image])[0].image_sizes[0][0] for _ in range(30)}
    assert seen == {48, 64}
    model.eval()
    assert {model.transform([image])[0].image_sizes[0] for _ in range(5)} == {(64, 80)}


def test_max_size_caps_the_longer_side():
    model = _model("model.min_size=64", "model.max_size=80").eval()
    (h, w), = model.transform([torch.rand(3, 20, 100)])[0].image_sizes
    assert w == 80 and h == 16


def test_exactly_one_proposal_mechanism():
    model = _model()
    with pytest.raises(ValueError, match="exactly one"):
        FasterRCNN(model.transform, model.backbone, None, model.roi_head, None)


@pytest.mark.parametrize("model_name", ["small", "faster_rcnn_r50_fpn"])
def test_boxes_stay_float32_under_bf16_autocast(model_name):
    """Anchors, proposals, the sampled RoIs and their targets, and the detections are float32 with
    ``trainer.amp=bf16`` (bf16 rounds a box centre at 512-2047 px by 2-4 px)."""
    model = _model(f"model={model_name}", "model.min_size=640", "model.max_size=640")
    seen: dict[str, list[torch.dtype]] = {}
    rpn, head = model.rpn, model.roi_head

    anchor_generator = rpn.anchor_generator.forward
    rpn.anchor_generator.forward = lambda *a: _record(seen, "anchors", anchor_generator(*a))
    model.rpn.register_forward_hook(lambda _m, _i, out: _record(seen, "proposals", out[0]) and None)
    sample = head.sample
    head.sample = lambda *a: _record(seen, "sampled", sample(*a))
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 640, 640, generator=g)]
    targets = [{"boxes": torch.tensor([[1000.3, 1200.7, 1800.1, 1900.9]]) / 3, "labels": torch.tensor([1])}]
    model.train()
    with torch.autocast("cpu", torch.bfloat16):
        out = model(images, targets)
    model.eval()
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        dets = model(images)
    assert all(v.dtype == torch.float32 for v in out["losses"].values())
    assert seen["anchors"] == seen["proposals"] == [torch.float32]
    assert seen["sampled"] == [torch.float32] * 2  # proposals with GT appended, and their matched GT
    assert dets["detections"][0]["boxes"].dtype == torch.float32


def _record(seen: dict, name: str, value):
    """Note the dtypes of ``value``'s box tensors under ``name``; return ``value`` unchanged."""
    from detlib.modeling.box_head import Sampled

    if isinstance(value, Sampled):
        seen[name] = [value.proposals.dtype, value.gt_boxes.dtype]
    else:
        seen[name] = sorted({t.dtype for t in value}, key=str)
    return value
