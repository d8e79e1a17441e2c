"""The training config as ``train.py`` composes it from ``configs/``, for tools that start from a preset."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from detlib.config import register

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def compose_train(overrides: Sequence[str] = ()) -> DictConfig:
    """``configs/train.yaml`` with Hydra ``overrides`` (``model=small``, ``loss.beta=0.5``), unresolved."""
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def is_group(key: str) -> bool:
    """``data`` in ``data=coco`` names a config group (a folder of ``configs/``), ``data.root`` does not."""
    key = key.lstrip("+~")
    return "." not in key and (CONFIGS / key).is_dir()
