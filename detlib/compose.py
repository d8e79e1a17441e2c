"""The training config as ``train.py`` composes it, for tools that start from a preset: from the configs the
package carries (``detlib.configs``: in a checkout the top-level ``configs/``, installed a copy inside the
package), so the ``detlib-*`` commands work outside a checkout too."""

from __future__ import annotations

from collections.abc import Sequence
from importlib.resources import files

from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from detlib.config import register

CONFIG_MODULE = "detlib.configs"


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/train.yaml`` with Hydra ``overrides`` (``model=small``, ``loss.beta=0.5``), unresolved."""
    register()
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def is_group(key: str) -> bool:
    """``data`` in ``data=coco`` names a config group (a folder of ``configs/``), ``data.root`` does not."""
    key = key.lstrip("+~")
    return "." not in key and files(CONFIG_MODULE).joinpath(key).is_dir()
