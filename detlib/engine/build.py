"""Build what a composed config names: the two box losses and the detector.

``train.py``, the tools (``detlib.tools``) and the tests build a model only through ``build_model``, so
the way a config becomes a model is written once. It is a thin wrapper around Hydra's ``instantiate``:
``num_classes`` comes from the dataset and the box losses from the ``loss`` / ``rpn_loss`` groups,
never from the ``model`` node.
"""

from __future__ import annotations

from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from detlib.losses import BoxLoss


def build_losses(cfg: DictConfig) -> tuple[BoxLoss, BoxLoss]:
    """``(box_loss, rpn_box_loss)`` from the config's ``loss`` and ``rpn_loss`` nodes."""
    return instantiate(cfg.loss), instantiate(cfg.rpn_loss)


def build_model(cfg: DictConfig, num_classes: int, box_loss: BoxLoss | None = None,
                rpn_box_loss: BoxLoss | None = None) -> nn.Module:
    """The detector ``cfg.model`` describes, with ``num_classes`` (background included) and the box losses
    (built from ``cfg.loss`` / ``cfg.rpn_loss`` unless given); fresh weights."""
    if box_loss is None:
        box_loss = instantiate(cfg.loss)
    if rpn_box_loss is None:
        rpn_box_loss = instantiate(cfg.rpn_loss)
    return instantiate(cfg.model, num_classes=num_classes, box_loss=box_loss, rpn_box_loss=rpn_box_loss)
