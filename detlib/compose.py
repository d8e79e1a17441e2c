"""The training config as ``train.py`` composes it, for tools that start from a preset: from the configs the
package carries (``detlib.configs``: in a checkout the top-level ``configs/``, installed a copy inside the
package), so the ``detlib-*`` commands work outside a checkout too. A checkout used through ``PYTHONPATH``
without installing it (the GPU machine's way) has no ``detlib.configs`` module: its ``configs/`` is read
directly."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

from hydra import compose, initialize_config_dir, initialize_config_module
from omegaconf import DictConfig

from detlib.config import register

CONFIG_MODULE = "detlib.configs"
CHECKOUT_CONFIGS = Path(__file__).resolve().parents[1] / "configs"  # detlib/../configs in a checkout


def _installed() -> bool:
    """Whether ``detlib.configs`` is importable (an installed or editable detlib), not only a checkout's folder."""
    try:
        return importlib.util.find_spec(CONFIG_MODULE) is not None
    except ModuleNotFoundError:
        return False


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/train.yaml`` with Hydra ``overrides`` (``model=small``, ``loss.beta=0.5``), unresolved."""
    register()
    where = (initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3") if _installed()
             else initialize_config_dir(config_dir=str(CHECKOUT_CONFIGS), version_base="1.3"))
    with where:
        return compose("train", overrides=list(overrides))


def is_group(key: str) -> bool:
    """``data`` in ``data=coco`` names a config group (a folder of ``configs/``), ``data.root`` does not."""
    key = key.lstrip("+~")
    root = files(CONFIG_MODULE) if _installed() else CHECKOUT_CONFIGS
    return "." not in key and root.joinpath(key).is_dir()
