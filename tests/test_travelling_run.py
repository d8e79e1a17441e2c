"""A trained run travels: its folder copied to a machine without the training data predicts and exports from
run.json's recorded classes, and evaluating says the val data is needed."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from detlib import Predictor
from detlib.tools import evaluate, export, predict

from .conftest import run_train


@pytest.mark.slow
def test_a_run_folder_copied_without_its_data_predicts_and_exports(tmp_path, capsys):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    proc = run_train("experiment=smoke", "trainer.device=cpu", "trainer.progress=false", f"data.root={cache}",
                     "model.roi_head.score_thresh=0.0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    val_ann = Path(json.loads((run_dir / "run.json").read_text())["data_files"]["val"])
    photos = tmp_path / "photos"
    photos.mkdir()
    for img in json.loads(val_ann.read_text())["images"][:2]:
        shutil.copy(val_ann.parent / img["file_name"], photos / Path(img["file_name"]).name)
    here = Predictor.from_run(run_dir, device="cpu")(sorted(photos.iterdir())[0])

    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)
    shutil.rmtree(run_dir)
    shutil.rmtree(cache)  # the data root, with the synthetic dataset's cache: nothing of the data is left

    p = Predictor.from_run(moved, device="cpu")
    there = p(sorted(photos.iterdir())[0])
    assert torch.equal(here["boxes"], there["boxes"]) and here["names"] == there["names"] and there["names"]
    assert set(p.names.values()) == {"rectangle", "ellipse", "triangle", "cross"}
    out = tmp_path / "preds"
    assert predict.main(["--run", str(moved), "--images", str(photos), "--out", str(out), "--device", "cpu",
                         "--score-thresh", "0.0"]) == 0
    assert json.loads((out / "detections.json").read_text())
    assert export.main(["--run", str(moved), "--out", str(tmp_path / "model.ts")]) == 0
    assert torch.jit.load(str(tmp_path / "model.ts")) is not None
    assert not cache.exists(), "predicting or exporting rebuilt the dataset"

    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate.main(["--run", str(moved), "--device", "cpu", "--out", str(tmp_path / "m.json"),
                              "--config-overrides", "data=coco", f"data.root={tmp_path / 'gone'}",
                              "data.train_ann=t.json", "data.train_images=i", "data.val_ann=v.json",
                              "data.val_images=i"]) == 1
    err = capsys.readouterr().err
    assert "needs the run's data, which is not here" in err and "data.root=DIR" in err
