"""The paired bootstrap over val images: pycocotools' own numbers, exact replicates on a case computed by
hand, zero width for identical runs, and compare_runs' val-sampling table and variance decomposition."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detlib.data.coco_files import coco_from_dict
from detlib.evaluation.bootstrap import bootstrap, image_evaluations, percentile_ci, resampled_ap, resamples
from detlib.tools import compare_runs

BOX = [10.0, 10.0, 20.0, 20.0]  # xywh


def _gt_dict(n: int, cats: int = 1) -> dict:
    images = [{"id": i + 1, "width": 64, "height": 64, "file_name": f"{i}.png"} for i in range(n)]
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1 + i % cats, "bbox": list(BOX), "area": 400.0,
             "iscrowd": 0} for i in range(n)]
    return {"images": images, "annotations": anns, "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(cats)]}


def _coco(data: dict) -> COCO:
    return coco_from_dict(data)


def _dets(n: int, bad: set[int] = frozenset(), shift: float = 0.0, cats: int = 1) -> list[dict]:
    """One detection per image: on the box (``shift`` px to the right), or on ``bad`` images a miss far away,
    scored below every hit (so the hits' precision is 1)."""
    out = []
    for i in range(n):
        x = 40.0 if i in bad else BOX[0] + shift
        out.append({"image_id": i + 1, "category_id": 1 + i % cats, "bbox": [x, 40.0 if i in bad else BOX[1], 20.0,
                                                                              20.0],
                    "score": (0.1 if i in bad else 0.9) - 0.001 * i / n})
    return out


def _pycocotools_ap(data: dict, dets: list[dict]) -> float:
    gt = _coco(data)
    with contextlib.redirect_stdout(io.StringIO()):
        E = COCOeval(gt, gt.loadRes(dets), iouType="bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    return float(E.stats[0])


def test_the_point_estimate_and_a_resample_are_pycocotools_on_those_images():
    rng = np.random.default_rng(1)
    n, data = 12, _gt_dict(12, cats=2)
    dets = [{"image_id": i + 1, "category_id": 1 + i % 2, "bbox": [BOX[0] + rng.normal() * 3, BOX[1] + rng.normal() * 3,
                                                                    20.0, 20.0], "score": float(rng.random())}
            for i in range(n) for _ in range(2)]
    E = image_evaluations(_coco(data), dets)
    assert resampled_ap(E)["AP"] == pytest.approx(_pycocotools_ap(data, dets), abs=1e-12)
    idx = np.array([0, 0, 3, 5, 5, 5, 7, 8, 10, 11, 11, 2])
    # The same resample as a val set of its own: image k of it is a copy of image idx[k], with its detections.
    copies = {"images": [], "annotations": [], "categories": data["categories"]}
    copied_dets = []
    for k, i in enumerate(idx):
        copies["images"].append({**data["images"][i], "id": k + 1})
        copies["annotations"].append({**data["annotations"][i], "id": k + 1, "image_id": k + 1})
        copied_dets += [{**d, "image_id": k + 1} for d in dets if d["image_id"] == i + 1]
    assert resampled_ap(E, idx)["AP"] == pytest.approx(_pycocotools_ap(copies, copied_dets), abs=1e-12)


def test_replicates_are_the_hand_computed_ap_of_each_resample():
    """A perfect run against one that misses 10 of 100 images: on a resample with m misses the second reaches
    recall (100 - m) / 100 at precision 1, so its AP is the share of COCO's 101 recall points up to there,
    (101 - m) / 101 (up to pycocotools' float comparison at the last point), and the difference's CI is that of
    a binomial(100, 0.1)."""
    n, bad = 100, set(range(0, 100, 10))
    gt = _coco(_gt_dict(n))
    perfect, missing = image_evaluations(gt, _dets(n)), image_evaluations(gt, _dets(n, bad))
    boot = bootstrap([perfect, missing], n_boot=400, seed=3)
    m = np.isin(resamples(n, 400, seed=3), sorted(bad)).sum(1)
    np.testing.assert_allclose(boot[:, 0], 1.0, atol=1e-12)
    by_hand = np.array([np.sum(np.linspace(0, 1, 101) <= (100 - k) / 100) / 101 for k in m])  # == (101 - m) / 101
    assert np.abs(by_hand - (101 - m) / 101).max() < 1.01 / 101
    np.testing.assert_allclose(boot[:, 1], by_hand, atol=1e-12)
    lo, hi = percentile_ci(boot[:, 1] - boot[:, 0])
    assert -17 / 101 <= lo <= -14 / 101 and -6 / 101 <= hi <= -4 / 101  # binomial(100, .1): 2.5 %, 97.5 % at 4, 16
    assert np.std(boot[:, 1] - boot[:, 0]) == pytest.approx(3 / 101, rel=0.15)  # sqrt(100 * .1 * .9) / 101


def test_identical_runs_give_zero_width_and_a_concentrated_difference_a_wide_one():
    n = 100
    gt = _coco(_gt_dict(n))
    a = image_evaluations(gt, _dets(n))
    spread = image_evaluations(gt, _dets(n, shift=3.0))  # every image a little worse: IoU 0.74
    concentrated = image_evaluations(gt, _dets(n, bad={3, 50, 97}))  # three images a lot worse
    boot = bootstrap([a, image_evaluations(gt, _dets(n)), spread, concentrated], n_boot=200)
    assert percentile_ci(boot[:, 1] - boot[:, 0]) == (0.0, 0.0)
    lo, hi = percentile_ci(boot[:, 2] - boot[:, 0])
    assert hi - lo < 1e-12 and lo < -0.1  # the same loss on every image: any resample shows it exactly
    lo, hi = percentile_ci(boot[:, 3] - boot[:, 0])
    assert hi - lo > 0.03 and hi > -0.03 / 2  # a few images: whether they are drawn decides it


def _run(path: Path, loss: str, seed: int, gt: Path, dets: list[dict], threads: int = 0) -> None:
    """A finished run folder as train.py writes it, with its detections."""
    path.mkdir(parents=True)
    ident = {"seed": seed, "loss._target_": f"detlib.losses.{loss}", "world_size": 1, "data.fingerprint.val": "v"}
    (path / "run.json").write_text(json.dumps({
        "identity": ident, "overrides": [f"loss={loss.lower()}", f"seed={seed}", f"trainer.num_threads={threads}"],
        "choices": {"loss": loss.lower()}, "config": {}, "data_files": {"val": str(gt)}}))
    data = json.loads(gt.read_text())
    (path / "metrics.json").write_text(json.dumps({"AP": _pycocotools_ap(data, dets), "AP50": 1.0}))
    (path / "detections.json").write_text(json.dumps(dets))


def test_compare_runs_shows_the_val_sampling_ci_and_the_variance_split(tmp_path, capsys):
    n = 60
    gt = tmp_path / "val.json"
    gt.write_text(json.dumps(_gt_dict(n)))
    for seed in range(3):
        _run(tmp_path / f"b{seed}", "SmoothL1", seed, gt, _dets(n, bad={seed}))
        _run(tmp_path / f"l{seed}", "L1", seed, gt, _dets(n, bad={seed, 10 + seed, 20 + seed * 2}))
    _run(tmp_path / "b0_rerun", "SmoothL1", 0, gt, _dets(n, bad={0, 1}), threads=1)  # same seed, another run
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "r"), "--baseline", "loss=smoothl1",
                              "--bootstrap", "200"]) == 0
    md = (tmp_path / "r" / "comparison.md").read_text()
    assert "## Val-sampling uncertainty (200 paired bootstrap resamples" in md
    line = next(x for x in md.split("## Val-sampling")[1].splitlines() if x.startswith("| loss=l1"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[1] == "3" and cells[6] == "val sampling"  # every pair differs by 2 missed images: no seed spread
    assert cells[3] == "undefined" or float(cells[3].lstrip("±")) < float(cells[5].lstrip("±"))
    decomposition = [x for x in md.splitlines() if x.startswith("| loss=l1")][-1]
    assert "(df 1)" in decomposition  # one same-seed rerun: floating-point chaos measured
    assert "Val-sampling CI (paired bootstrap over val images)" in capsys.readouterr().out


def test_compare_runs_without_detections_says_so(tmp_path, capsys):
    gt = tmp_path / "val.json"
    gt.write_text(json.dumps(_gt_dict(10)))
    for seed in range(2):
        for loss in ("SmoothL1", "L1"):
            _run(tmp_path / f"{loss}{seed}", loss, seed, gt, _dets(10, bad={seed}))
            (tmp_path / f"{loss}{seed}" / "detections.json").unlink()
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    assert "no val-sampling CIs: no run has its detections" in capsys.readouterr().out
