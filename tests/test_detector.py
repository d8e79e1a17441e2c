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
