"""Backbones: feature extractors returning an ordered dict of feature maps and ``out_channels``.

Nothing here downloads weights. Pretrained weights come only from a local file
(``model.backbone.weights=PATH``); a missing file or keys that don't fit is an error naming
the path and the first mismatched keys.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models.detection.backbone_utils import BackboneWithFPN, resnet_fpn_backbone
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

log = logging.getLogger(__name__)


def load_weights(module: nn.Module, path: str | None, ignore: tuple[str, ...] = (), strip: str = "") -> None:
    """Load a local state dict into ``module``; errors name the file and the first bad keys.

    ``ignore``: key prefixes in the file to leave out (e.g. a classifier's ``fc.``); ``strip``: a
    prefix to remove from the file's keys (``features.`` for a torchvision VGG or MobileNet file,
    whose trunk is loaded on its own). BatchNorm's ``num_batches_tracked`` counters are dropped:
    ``FrozenBatchNorm2d`` has none, and they carry no weights.
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
    state = {k: v for k, v in state.items() if not (ignore and k.startswith(ignore))}
    if strip:
        state = {k.removeprefix(strip): v for k, v in state.items()}
    own = module.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") or k in own}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        raise ValueError(
            f"model.backbone.weights: {p} does not fit the backbone: "
            f"missing {missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}), "
            f"wrong shape {wrong[:5]} ({len(wrong)})")
    module.load_state_dict(state, strict=False)  # all keys checked above; strict would want BN counters


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallConvFPN(nn.Module):
    """A small conv net for the built-in data on CPU, with torchvision's FPN on top.

    Four stages of two 3x3 convs (strides 2, 4, 8, 16; ``width``, 2, 4 and 6 times that many channels);
    the FPN gives maps ``"0", "1", "2"`` at strides 4, 8, 16 with ``out_channels`` channels each. The
    sizes are set in ``configs/model/small.yaml``.
    """

    def __init__(self, width: int, out_channels: int, weights: str | None = None) -> None:
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


def trunk_defaults(weights: str | None, trainable_layers: int | None, frozen_bn: bool | None,
                   all_layers: int) -> tuple[int, bool]:
    """torchvision's rule for a detection trunk: with pretrained weights, train the top 3 layers and freeze
    BatchNorm; without, every layer trains and BatchNorm learns (frozen random statistics would be noise).
    Values the config sets are kept."""
    pretrained = weights is not None
    if not pretrained and (trainable_layers is None or frozen_bn is None):
        log.warning("model.backbone: no pretrained weights (model.backbone.weights=PATH), so every layer trains "
                    "and BatchNorm is not frozen, as torchvision does; set trainable_layers/frozen_bn to override")
    return (trainable_layers if trainable_layers is not None else (3 if pretrained else all_layers),
            frozen_bn if frozen_bn is not None else pretrained)


def resnet_fpn(
    depth: int = 50, trainable_layers: int | None = None, weights: str | None = None, frozen_bn: bool | None = None
) -> BackboneWithFPN:
    """torchvision's ResNet-{18,50}-FPN (maps ``"0".."3"`` and ``"pool"``, 256 channels), no download.

    ``weights``: a local ImageNet state dict for the ResNet trunk (torchvision's file works as is).
    ``trainable_layers``/``frozen_bn``: None follows ``trunk_defaults``.
    """
    from torchvision.ops.misc import FrozenBatchNorm2d

    trainable_layers, frozen_bn = trunk_defaults(weights, trainable_layers, frozen_bn, 5)
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    backbone = resnet_fpn_backbone(
        backbone_name=f"resnet{depth}", weights=None, norm_layer=norm,
        trainable_layers=trainable_layers, extra_blocks=LastLevelMaxPool())
    load_weights(backbone.body, weights, ignore=("fc.",))
    return backbone


def mobilenet_v3_fpn(trainable_layers: int | None = None, weights: str | None = None,
                     frozen_bn: bool | None = None) -> BackboneWithFPN:
    """torchvision's MobileNetV3-Large-FPN trunk (maps ``"0"``, ``"1"``, both at stride 32, plus ``"pool"``).

    As ``fasterrcnn_mobilenet_v3_large_fpn``: the last two stages feed the FPN. ``weights``: a
    local ImageNet state dict of ``mobilenet_v3_large`` (its ``features.*`` keys; the classifier is ignored).
    """
    from torchvision.models.detection.backbone_utils import mobilenet_backbone
    from torchvision.ops.misc import FrozenBatchNorm2d

    trainable_layers, frozen_bn = trunk_defaults(weights, trainable_layers, frozen_bn, 6)
    norm = FrozenBatchNorm2d if frozen_bn else nn.BatchNorm2d
    backbone = mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True, norm_layer=norm,
                                  trainable_layers=trainable_layers)
    load_weights(backbone.body, weights, ignore=("classifier.",), strip="features.")
    return backbone


class VGG16(nn.Module):
    """The classic Fast R-CNN trunk: VGG16's conv layers up to conv5_3 (no last max-pool).

    One feature map ``"0"``: ``(B, 512, H/16, W/16)``. ``trainable_layers`` (0-5) counts conv blocks
    from the top; Fast R-CNN fine-tunes conv3_1 and up (3), since conv1-2 learn generic filters.
    VGG16 has no BatchNorm. ``weights``: a local state dict of torchvision's ``vgg16`` (``features.*``
    keys; the classifier is ignored) or of this trunk.
    """

    BLOCK_ENDS = (4, 9, 16, 23, 30)  # index of each block's max-pool in torchvision's vgg16.features

    def __init__(self, trainable_layers: int | None = None, weights: str | None = None) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        trainable_layers, _ = trunk_defaults(weights, trainable_layers, False, 5)

        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"model.backbone.trainable_layers must be in [0, 5], got {trainable_layers}")
        # torchvision's vgg16().features without building its 120M-parameter classifier; stride 16: no pool5
        self.body = make_layers(cfgs["D"], batch_norm=False)[:-1]
        for m in self.body.modules():
            if isinstance(m, nn.Conv2d):  # VGG's own initialisation
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        load_weights(self.body, weights, ignore=("classifier.",), strip="features.")
        frozen_until = ([0, *self.BLOCK_ENDS])[5 - trainable_layers]
        for layer in list(self.body)[:frozen_until]:
            layer.requires_grad_(False)
        self.out_channels = 512

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict([("0", self.body(x))])
