"""The optimizer, built in one place from the ``optimizer`` config group and the trainer's settings.

``configs/optimizer/NAME.yaml`` names the optimizer class and its own settings as a ``_partial_``
``_target_`` (SGD's momentum, AdamW's betas). The learning rate and the weight decay are the trainer's,
``trainer.lr`` and ``trainer.weight_decay``, whatever the optimizer (the LR schedule scales that lr; sweeps
and the HParams table read one key), and ``build_optimizer`` passes them with the parameter groups:

* the trainable parameters (``requires_grad``: frozen backbone stages have none), in ``model.parameters()``
  order;
* one group per weight decay: ``trainer.norm_weight_decay`` for the weights and biases of normalisation
  layers (BatchNorm, GroupNorm, LayerNorm, ...; torchvision's ``--norm-weight-decay``),
  ``trainer.bias_weight_decay`` for the other biases, each ``trainer.weight_decay`` when null. The default
  is one group in which every parameter decays, as torchvision's and detectron2's Faster R-CNN train with
  SGD; AdamW recipes (Swin, ViTDet) exempt the norms, as ``configs/optimizer/adamw.yaml`` does.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from hydra.utils import instantiate
from torch import nn

from detlib.config import TrainerConfig

# What torchvision's references count as normalisation layers (torchvision.ops._utils.split_normalization_params).
NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
               nn.LocalResponseNorm)


def param_groups(model: nn.Module, weight_decay: float, norm_weight_decay: float | None = None,
                 bias_weight_decay: float | None = None) -> list[dict]:
    """The trainable parameters of ``model`` as optimizer groups, one per weight decay, in order of first
    appearance: ``{"params": [...]}`` for those at ``weight_decay`` (the optimizer's own setting), with a
    ``"weight_decay"`` of their own for the others. With both null: ``[{"params": every trainable parameter}]``."""
    norm = {id(p) for m in model.modules() if isinstance(m, NORM_LAYERS) for p in m.parameters(recurse=False)}
    groups: dict[float, list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        own = norm_weight_decay if id(p) in norm else bias_weight_decay if name.rsplit(".", 1)[-1] == "bias" else None
        groups.setdefault(weight_decay if own is None else own, []).append(p)
    return [{"params": ps} if wd == weight_decay else {"params": ps, "weight_decay": wd} for wd, ps in groups.items()]


def build_optimizer(model: nn.Module, spec: Mapping | None, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """The optimizer ``spec`` names (the config's ``optimizer`` node) over ``param_groups(model, ...)``, at
    ``cfg.lr`` and ``cfg.weight_decay``."""
    if not spec:
        raise ValueError("config: optimizer is not set (choose one from configs/optimizer: optimizer=sgd)")
    factory = instantiate(spec, _convert_="all")  # lists as lists (AdamW's betas), not ListConfigs in checkpoints
    groups = param_groups(model, cfg.weight_decay, cfg.norm_weight_decay, cfg.bias_weight_decay)
    return factory(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def check_optimizer(spec: Mapping | None, cfg: TrainerConfig) -> None:
    """Build the optimizer once over a stand-in layer, so a value it refuses (``optimizer.betas=[0.9,2]``) fails
    at start-up, before any data is built, naming the optimizer."""
    try:
        build_optimizer(nn.Linear(1, 1), spec, cfg)
    except ValueError as e:
        raise ValueError(f"config: optimizer ({(spec or {}).get('_target_')}): {e}") from e
