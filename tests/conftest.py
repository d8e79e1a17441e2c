"""Shared fixtures: a tiny synthetic dataset on disk and Hydra compose, all real components."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from detlib.config import register

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = str(ROOT / "configs")
register()


def compose_cfg(*overrides: str):
    """The composed training config, as ``train.py`` would see it."""
    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def run_train(*args: str, cwd: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``train.py`` in a fresh interpreter, as a user would."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd or ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A cache folder shared by the tests that train (the smoke dataset is built once)."""
    return tmp_path_factory.mktemp("detlib-cache")
