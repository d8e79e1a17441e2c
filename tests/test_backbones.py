"""Backbones: each model config builds and takes one training step on CPU; frozen layers and BatchNorm;
weights only from a local file, with errors naming the path and the first mismatched keys."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from detlib.engine.build import build_model
from detlib.modeling.backbone import VGG16, load_weights, mobilenet_v3_fpn, resnet_fpn

from .conftest import compose_cfg

SMALL = ["model.min_size=64", "model.max_size=96", "model.roi_head.hidden=64", "model.roi_head.batch_size_per_image=32"]
SMALL_RPN = ["model.rpn.post_nms_top_n_train=64", "model.rpn.pre_nms_top_n_train=256"]  # models with an RPN
MODELS = [
    "small",
    "fast_rcnn",
    "faster_rcnn_r18_fpn",
    "faster_rcnn_mobilenet_v3_fpn",
    pytest.param("faster_rcnn_r50_fpn", marks=pytest.mark.slow),
    pytest.param("faster_rcnn_vgg16", marks=pytest.mark.slow),
    pytest.param("fast_rcnn_vgg16", marks=pytest.mark.slow),
]


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.mark.parametrize("name", MODELS)
def test_one_training_step_on_cpu(name):
    cfg = compose_cfg(f"model={name}", *SMALL, *([] if name.startswith("fast_rcnn") else SMALL_RPN))
    torch.manual_seed(0)
    model = build_model(cfg, 3)
    images = [torch.rand(3, 64, 96), torch.rand(3, 96, 64)]
    targets = [{"boxes": torch.tensor([[10.0, 10, 50, 40]]), "labels": torch.tensor([1]), "image_id": 1},
               {"boxes": torch.tensor([[5.0, 30, 40, 90], [0, 0, 20, 20]]), "labels": torch.tensor([2, 1]), "image_id": 2}]
    params = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.backbone.parameters() if not p.requires_grad]
    before = [p.detach().clone() for p in params], [p.detach().clone() for p in frozen]
    out = model(images, targets)
    loss = sum(out["losses"].values())
    assert torch.isfinite(loss) and ("loss_rpn_cls" in out["losses"]) == (model.rpn is not None)
    torch.optim.SGD(params, lr=0.01).zero_grad()
    loss.backward()
    torch.optim.SGD(params, lr=0.01).step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before[0]))
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(frozen, before[1]))
    model.eval()
    with torch.no_grad():
        dets = model(images, targets, detect=True)["detections"]
    assert len(dets) == 2 and all(d["boxes"].shape[1] == 4 for d in dets)


def test_vgg16_is_one_stride_16_map_with_classic_freezing():
    vgg = VGG16(trainable_layers=3)
    feats = vgg(torch.rand(1, 3, 64, 96))
    assert list(feats) == ["0"] and feats["0"].shape == (1, 512, 4, 6) and vgg.out_channels == 512
    convs = [m for m in vgg.body if isinstance(m, nn.Conv2d)]
    assert [c.weight.requires_grad for c in convs] == [False] * 4 + [True] * 9  # conv1_x, conv2_x frozen
    assert all(p.requires_grad for p in VGG16(trainable_layers=5).parameters())
    with pytest.raises(ValueError, match="trainable_layers"):
        VGG16(trainable_layers=6)


@pytest.mark.parametrize("build", [lambda bn: resnet_fpn(18, 3, None, bn), lambda bn: mobilenet_v3_fpn(3, None, bn)])
def test_frozen_batchnorm_option(build):
    frozen, trained = build(True), build(False)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in trained.body.modules())


def test_resnet_trainable_layers():
    none = resnet_fpn(18, trainable_layers=0)
    assert not any(p.requires_grad for p in none.body.parameters())
    three = resnet_fpn(18, trainable_layers=3)
    trainable = {n.split(".")[0] for n, p in three.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}


@pytest.mark.parametrize("arch,build,module", [
    ("resnet18", lambda w: resnet_fpn(18, 3, w), lambda b: b.body),
    ("mobilenet_v3_large", lambda w: mobilenet_v3_fpn(3, w), lambda b: b.body),
    pytest.param("vgg16", lambda w: VGG16(3, w), lambda b: b.body, marks=pytest.mark.slow),  # a 138M-param file
])
def test_torchvision_imagenet_file_loads_as_is(tmp_path, arch, build, module):
    """torchvision's own classification state dict (BatchNorm counters, classifier and all) fits the trunk."""
    torch.manual_seed(0)
    net = getattr(torchvision.models, arch)(weights=None)
    path = tmp_path / f"{arch}.pth"
    torch.save(net.state_dict(), path)
    backbone = build(str(path))
    own = module(backbone).state_dict()
    src = {k.removeprefix("features."): v for k, v in net.state_dict().items()}
    checked = [k for k in own if k in src]
    assert len(checked) > 10
    assert all(torch.equal(own[k], src[k]) for k in checked)


def test_missing_file_and_mismatched_keys_name_path_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.pth")):
        resnet_fpn(18, weights=str(tmp_path / "none.pth"))
    path = tmp_path / "vgg.pth"
    torch.save(VGG16(5).body.state_dict(), path)
    with pytest.raises(ValueError) as e:
        resnet_fpn(18, weights=str(path))
    msg = str(e.value)
    assert str(path) in msg and "missing ['conv1.weight'" in msg and "unexpected ['0.weight'" in msg
    wrong = {k: v[:1] if k == "28.weight" else v for k, v in VGG16(5).body.state_dict().items()}
    torch.save(wrong, path)
    with pytest.raises(ValueError, match=r"wrong shape \['28.weight \(1, 512, 3, 3\) vs \(512, 512, 3, 3\)'\]"):
        VGG16(weights=str(path))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pth"):
        load_weights(nn.Linear(2, 2), str(tmp_path / "junk.pth"))


def test_without_pretrained_weights_every_layer_trains_and_batchnorm_learns(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        fresh = resnet_fpn(depth=18)
    assert "no pretrained weights" in caplog.text
    assert all(p.requires_grad for p in fresh.parameters())
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in fresh.modules())
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    caplog.clear()
    with caplog.at_level("WARNING"):
        pretrained = resnet_fpn(depth=18, weights=str(path))
    assert "no pretrained weights" not in caplog.text
    assert any(isinstance(m, FrozenBatchNorm2d) for m in pretrained.modules())
    frozen = {n.split(".")[1] for n, p in pretrained.named_parameters() if not p.requires_grad}
    assert frozen == {"conv1", "layer1"}  # torchvision's 3 trainable layers: layer2..layer4
    kept = resnet_fpn(depth=18, trainable_layers=2, frozen_bn=True)  # what the config sets is kept
    assert any(isinstance(m, FrozenBatchNorm2d) for m in kept.modules())
    assert not any(p.requires_grad for n, p in kept.named_parameters() if n.startswith("body.layer2"))
