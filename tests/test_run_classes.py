"""A run is evaluated on the classes it learned: matched by name against run.json's classes, or refused;
a val file other than the recorded one is named in a warning."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

from detlib.tools import evaluate

from .conftest import run_train
from .fixtures import write_coco


def _coco_args(root: Path) -> list[str]:
    return ["data=coco", f"data.root={root}", "data.train_ann=train.json", "data.train_images=images",
            "data.val_ann=val.json", "data.val_images=images"]


@pytest.fixture(scope="module")
def coco_run(tmp_path_factory) -> tuple[Path, Path]:
    """A two-iteration run on COCO files whose category ids are 3 (red) and 7 (green)."""
    root = tmp_path_factory.mktemp("classes-data")
    write_coco(root, num_train=4, num_val=4)
    run_dir = tmp_path_factory.mktemp("classes-run")
    proc = run_train(*_coco_args(root), "experiment=smoke", "trainer.device=cpu", "trainer.max_iters=2",
                     "trainer.progress=false", "model.roi_head.score_thresh=0.0", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, root


def _other_root(tmp_path: Path, root: Path, edit) -> Path:
    """A copy of the data whose val.json is ``edit(val)``."""
    other = tmp_path / "other"
    shutil.copytree(root, other)
    val = json.loads((other / "val.json").read_text())
    (other / "val.json").write_text(json.dumps(edit(val)))
    return other


def _evaluate(run_dir: Path, out: Path, *overrides: str) -> tuple[int, str, list[dict]]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        rc = evaluate.main(["--run", str(run_dir), "--device", "cpu", "--out", str(out / "m.json"),
                            "--dets", str(out / "dets.json"), "--config-overrides", *overrides])
    dets = json.loads((out / "dets.json").read_text()) if rc == 0 else []
    return rc, err.getvalue(), dets


def _swap_ids(val: dict) -> dict:
    """The same names under other ids: red 3 -> 7, green 7 -> 3 (and the annotations with them)."""
    swap = {3: 7, 7: 3}
    val["categories"] = [{**c, "id": swap[c["id"]]} for c in val["categories"]]
    for a in val["annotations"]:
        a["category_id"] = swap[a["category_id"]]
    return val


def test_run_json_records_the_classes_in_label_order(coco_run):
    record = json.loads((coco_run[0] / "run.json").read_text())
    assert record["classes"] == [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]


def test_same_class_names_under_other_ids_are_matched_by_name(coco_run, tmp_path):
    run_dir, root = coco_run
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rc, _, same = _evaluate(run_dir, tmp_path / "a")
    assert rc == 0 and same, "the run must detect something for this test to mean anything"
    other = _other_root(tmp_path, root, _swap_ids)
    rc, err, swapped = _evaluate(run_dir, tmp_path / "b", f"data.root={other}")
    assert rc == 0, err
    names = {3: "red", 7: "green"}
    swapped_names = {7: "red", 3: "green"}
    assert [(d["image_id"], names[d["category_id"]]) for d in same] == \
        [(d["image_id"], swapped_names[d["category_id"]]) for d in swapped]
    assert "matched by name" in err and "red (run id 3 -> file id 7)" in err
    a = json.loads((tmp_path / "a" / "m.json").read_text())
    b = json.loads((tmp_path / "b" / "m.json").read_text())
    assert a == b  # the same classes scored: the same numbers


def test_other_class_names_are_refused_naming_the_difference(coco_run, tmp_path, capsys):
    run_dir, root = coco_run

    def rename(val: dict) -> dict:
        val["categories"] = [{**c, "name": "blue"} if c["name"] == "green" else c for c in val["categories"]]
        return val

    other = _other_root(tmp_path, root, rename)
    for name in ("train.json",):  # the train file too: the model is built with its class count
        shutil.copy(other / "val.json", other / name)
    rc, err, _ = _evaluate(run_dir, tmp_path, f"data.root={other}")
    assert rc == 1
    assert "classes are not the ones run" in err and "missing: ['green']" in err and "not learned: ['blue']" in err


def test_changed_val_annotations_are_named_in_a_warning(coco_run, tmp_path):
    run_dir, root = coco_run

    def halve(val: dict) -> dict:
        val["annotations"] = val["annotations"][::2]
        return val

    other = _other_root(tmp_path, root, halve)
    rc, err, _ = _evaluate(run_dir, tmp_path, f"data.root={other}")
    assert rc == 0, err
    assert f"warning: {other / 'val.json'}: not the val annotations run" in err and "sha256" in err


def test_a_run_without_recorded_classes_keeps_the_id_order_with_a_warning(coco_run, tmp_path):
    run_dir, _ = coco_run
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old)
    record = json.loads((old / "run.json").read_text())
    del record["classes"]
    (old / "run.json").write_text(json.dumps(record))
    rc, err, dets = _evaluate(old, tmp_path)
    assert rc == 0, err
    assert "records no classes (an older run)" in err and {d["category_id"] for d in dets} <= {3, 7}
