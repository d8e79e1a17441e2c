"""Shared fixtures: a tiny synthetic dataset on disk and Hydra compose, all real components."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from detlib.config import register
from detlib.evaluation import backends

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


@pytest.fixture(params=[pytest.param(b, marks=pytest.mark.skipif(
    not backends.installed(b), reason=f"{backends.PACKAGES[b]} is not installed (uv sync; --extra fast-eval)"))
    for b in backends.BACKENDS if b != "auto"])
def eval_backend(request) -> str:
    """Each COCO evaluation backend in turn (pycocotools itself too), for the tests that compare one with
    pycocotools run directly; a backend not installed here is skipped, with the reason."""
    return request.param


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A cache folder shared by the tests that train (the smoke dataset is built once)."""
    return tmp_path_factory.mktemp("detlib-cache")


@pytest.fixture(scope="session")
def trained(tmp_path_factory, data_root) -> tuple[Path, Path, list[dict]]:
    """A smoke run, its val annotation file and evaluate.py's detections of the val set."""
    run_dir = tmp_path_factory.mktemp("predict-smoke")
    proc = run_train("experiment=smoke", "trainer.device=cpu", f"data.root={data_root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    dets = run_dir / "dets.json"
    from detlib.tools import evaluate

    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate.main(["--run", str(run_dir), "--device", "cpu", "--out", str(run_dir / "m.json"),
                              "--dets", str(dets)]) == 0
    train_ann = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["meta"]["data_files"]["train"]
    return run_dir, Path(train_ann).with_name("instances_val.json"), json.loads(dets.read_text())


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: skipped, with the reason, where there is none."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (gpu marker): run `pytest -m gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
