"""Backbones: feature extractors returning an ordered dict of feature maps and ``out_channels``.

Nothing here downloads weights. Pretrained weights come only from a local file
(``model.backbone.weights=PATH``); a missing file or keys that don't fit is an error naming
the path and the first mismatched keys.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


def load_weights(module: nn.Module, path: str | None, ignore: tuple[str, ...] = ()) -> None:
    """Load a local state dict into ``module``; errors name the file and the first bad keys.

    ``ignore``: key prefixes in the file to leave out (e.g. a classifier's ``fc.``).
    """
    if not path:
        return
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"model.backbone.weights: file not found: {p}")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the same user error
        raise ValueError(f"model.backbone.weights: cannot read {p}: {e}") from e
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    state = {k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"model.backbone.weights: {p} does not fit the backbone: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
            f"wrong shape {wrong[:5]} ({len(wrong)})")
    module.load_state_dict(state)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallConvFPN(nn.Module):
    """A small conv net for the built-in data on CPU, with torchvision's FPN on top.

    Four stages of two 3x3 convs (strides 2, 4, 8, 16); the FPN gives maps ``"0", "1", "2"`` at
    strides 4, 8, 16 with ``out_channels`` channels each.
    """

    def __init__(self, width: int = 32, out_channels: int = 96, weights: str | None = None) -> None:
        super().__init__()
        w = width
        self.stages = nn.ModuleList([
            nn.Sequential(_conv(3, w, 2), _conv(w, w)),              # stride 2
            nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w)),  # stride 4
            nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w)),  # stride 8
            nn.Sequential(_conv(4 * w, 6 * w, 2), _conv(6 * w, 6 * w)),  # stride 16
        ])
        self.fpn = FeaturePyramidNetwork([2 * w, 4 * w, 6 * w], out_channels)
        self.out_channels = out_channels
        load_weights(self, weights)

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i >= 1:
                feats[str(i - 1)] = x
        return self.fpn(feats)


def resnet_fpn(
    depth: int = 50, trainable_layers: int = 3, weights: str | None = None, frozen_bn: bool = True
) -> BackboneWithFPN:
    """torchvision's ResNet-{18,50}-FPN (maps ``"0".."3"`` and ``"pool"``, 256 channels), no download.

    ``weights``: a local ImageNet state dict for the ResNet trunk (torchvision's file works as is).
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{depth}", weights=None, norm_layer=norm,
        trainable_layers=trainable_layers, extra_blocks=LastLevelMaxPool())
    load_weights(backbone.body, weights, ignore=("fc.",))
    return backbone
