"""The package carries its configs: the wheel, installed outside the checkout (without reinstalling torch: no
dependencies, into a folder first on PYTHONPATH), composes its configs and predicts from a run folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

SKIP = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "outputs", "multirun", "__pycache__",
                              ".pytest_cache", ".ruff_cache", "docs", "tests")


def _build_wheel(out: Path) -> Path:
    """The wheel of a copy of the checkout (a build leaves build/ and *.egg-info/ in its source folder)."""
    src = out / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path.home() / ".local" / "bin"))
    if uv is not None:
        cmd = [uv, "build", "--wheel", "--out-dir", str(out / "dist"), str(src)]
    else:
        cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "dist"), str(src)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (wheel,) = (out / "dist").glob("detlib-*.whl")
    return wheel


def _install(wheel: Path, target: Path) -> None:
    uv = shutil.which("uv") or shutil.which("uv", path=str(Path.home() / ".local" / "bin"))
    cmd = ([uv, "pip", "install", "--python", sys.executable] if uv else [sys.executable, "-m", "pip", "install"]) + [
        "--no-deps", "--target", str(target), str(wheel)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]


@pytest.mark.slow
def test_the_installed_wheel_composes_its_configs_and_predicts_outside_the_checkout(trained, tmp_path, data_root):
    run_dir, val_ann, _ = trained
    wheel = _build_wheel(tmp_path / "build")
    site = tmp_path / "site"
    _install(wheel, site)
    yamls = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert yamls and yamls == sorted(p.relative_to(site / "detlib" / "configs").as_posix()
                                     for p in (site / "detlib" / "configs").rglob("*.yaml"))
    work = tmp_path / "elsewhere"  # no configs/ here, nor anywhere up from it
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "2"}

    def run(*cmd: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(cmd), cwd=work, env=env, capture_output=True, text=True, timeout=300)

    where = run(sys.executable, "-c", "import detlib, detlib.configs, detlib.compose as c; print(detlib.__file__); "
                "print(detlib.configs.__file__); print(c.compose_train(['experiment=smoke']).trainer.max_iters)")
    assert where.returncode == 0, where.stderr[-3000:]
    lib, configs, iters = where.stdout.split()
    assert Path(lib).is_relative_to(site) and Path(configs).is_relative_to(site), where.stdout  # not the checkout
    assert iters == "6"
    browse = run(str(site / "bin" / "detlib-browse-dataset"), "experiment=smoke", f"data.root={data_root}",
                 "--num", "2", "--out", "browse")
    assert browse.returncode == 0, browse.stderr[-3000:]
    assert len(list((work / "browse").glob("*.png"))) == 2
    photos = work / "photos"
    photos.mkdir()
    for img in json.loads(val_ann.read_text())["images"][:2]:
        shutil.copy(val_ann.parent / img["file_name"], photos / Path(img["file_name"]).name)
    predict = run(str(site / "bin" / "detlib-predict"), "--run", str(run_dir), "--images", "photos", "--out", "preds",
                  "--device", "cpu")
    assert predict.returncode == 0, predict.stderr[-3000:]
    assert (work / "preds" / "detections.json").is_file() and "2 images" in predict.stdout
