"""TIDE's error decomposition and the true positives' IoU, on fixtures whose errors are known by construction."""

from __future__ import annotations

import json

import pytest
import torch
from torchvision.ops import box_iou

from detlib.data.coco import coco_from_dict
from detlib.evaluation.coco_eval import evaluate_coco, true_positive_ious
from detlib.evaluation.tide import ERRORS, tide_errors


def _gt(boxes: list[tuple[int, list[float]]]) -> dict:
    return {"images": [{"id": 1, "width": 100, "height": 100, "file_name": "1.png"}],
            "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
            "annotations": [{"id": i + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                            for i, (c, b) in enumerate(boxes)]}


def _dets(dets: list[tuple[int, list[float], float]]) -> list[dict]:
    return [{"image_id": 1, "category_id": c, "bbox": b, "score": s} for c, b, s in dets]


# One error of each kind (xywh boxes; class 1 = a, 2 = b).
GT = _gt([(1, [0, 0, 20, 20]),    # g1: found (d1), then found again (d4: Dupe)
          (1, [40, 0, 20, 20]),   # g2: found with the wrong class (d2: Cls)
          (1, [0, 40, 20, 20]),   # g3: found 1/3 IoU off (d3: Loc)
          (1, [40, 40, 20, 20]),  # g4: never found (Miss)
          (1, [70, 70, 20, 20]),  # g5: found (d6)
          (2, [70, 0, 20, 20]),   # g6: found (d7)
          (1, [0, 70, 20, 20])])  # g7: found 1/3 IoU off with the wrong class (d8: Both)
DETS = _dets([(1, [0, 0, 20, 20], 0.95), (2, [40, 0, 20, 20], 0.9), (1, [0, 50, 20, 20], 0.85),
              (1, [0, 0, 20, 20], 0.8), (1, [85, 30, 5, 5], 0.75),  # d5: on background (Bkg)
              (1, [70, 70, 20, 20], 0.5), (2, [70, 0, 20, 20], 0.6), (2, [0, 80, 20, 20], 0.7)])


def test_each_error_kind_is_counted_and_fixing_it_gains_ap():
    stats, E = evaluate_coco(coco_from_dict(GT), DETS)
    out = tide_errors(E)
    # TIDE counts a ground truth hit only by a Both error as missed too ("undetected ground truth not
    # covered by a classification or localisation error"): g4 and g7.
    assert out["count"] == dict.fromkeys(ERRORS, 1) | {"Miss": 2}
    assert all(out["dAP"][k] > 0 for k in ERRORS), out["dAP"]
    assert out["AP50"] == pytest.approx(stats["AP50"], abs=1e-6)  # TIDE's AP50 is pycocotools' AP50
    assert out["special"]["FalseNeg"] > 0 and out["special"]["FalsePos"] > 0


def test_perfect_detections_have_no_errors():
    gt = _gt([(1, [0, 0, 20, 20]), (2, [50, 50, 30, 10])])
    out = tide_errors(evaluate_coco(coco_from_dict(gt), _dets([(1, [0, 0, 20, 20], 0.9), (2, [50, 50, 30, 10], 0.8)]))[1])
    assert out["AP50"] == pytest.approx(1.0) and out["count"] == dict.fromkeys(ERRORS, 0)
    assert out["dAP"] == pytest.approx(dict.fromkeys(ERRORS, 0.0))


def test_true_positive_ious_are_those_of_pycocotools_matches():
    gt = _gt([(1, [0, 0, 20, 20]), (1, [40, 40, 20, 20]), (2, [0, 50, 40, 20])])
    dets = [(1, [0, 0, 20, 16], 0.9),     # TP of g1, IoU 0.8
            (1, [0, 0, 20, 20], 0.5),     # the better box, but scored lower: a duplicate, not a TP
            (1, [42, 40, 20, 20], 0.7),   # TP of g2
            (1, [45, 45, 30, 30], 0.6),   # overlaps g2 below 0.5: a false positive
            (2, [4, 50, 40, 20], 0.8)]    # TP of g3
    _, E = evaluate_coco(coco_from_dict(gt), _dets(dets))
    got = sorted(true_positive_ious(E).tolist())

    def iou(a, b):
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a, b)]
        return box_iou(torch.tensor(xyxy[:1], dtype=torch.float64), torch.tensor(xyxy[1:], dtype=torch.float64)).item()

    want = sorted([iou(dets[0][1], gt["annotations"][0]["bbox"]), iou(dets[2][1], gt["annotations"][1]["bbox"]),
                   iou(dets[4][1], gt["annotations"][2]["bbox"])])
    assert got == pytest.approx(want) and want[0] == pytest.approx(0.8)


def test_no_detections_leave_tide_out_without_failing():
    _, E = evaluate_coco(coco_from_dict(GT), [])
    assert tide_errors(E) is None or tide_errors(E)["AP50"] == 0.0


def test_a_run_without_tidecv_still_writes_its_metrics(tmp_path, data_root):
    """tidecv is optional (the GPU machine lacks it): TIDE is left out with one warning, metrics.json is written."""
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    hidden = tmp_path / "hide"
    (hidden / "tidecv").mkdir(parents=True)
    (hidden / "tidecv" / "__init__.py").write_text("raise ImportError('No module named tidecv (hidden by the test)')\n")
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT)]), "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "experiment=smoke", "trainer.device=cpu",
                           f"data.root={data_root}", f"hydra.run.dir={run}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "metrics.json").is_file()
    assert json.loads((run / "eval_detail.json").read_text())["tide"] is None
    assert (proc.stdout + proc.stderr).count("TIDE left out: tidecv cannot be imported") == 1
