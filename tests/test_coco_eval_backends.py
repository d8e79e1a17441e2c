"""``eval.backend``: every backend gives pycocotools' numbers, down to the precision arrays, TIDE and the true
positives' IoU (``eval_backend``: each installed backend in turn, pycocotools itself too); ``auto`` picks the
fastest installed one that does."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest

from detlib.config import Config, EvalBackend, check_ranges
from detlib.data.coco import coco_from_dict
from detlib.evaluation import backends
from detlib.evaluation.coco_eval import (
    STAT_NAMES,
    ap_per_iou,
    evaluate_coco,
    per_class_ap,
    true_positive_ious,
)
from detlib.evaluation.tide import tide_errors

# Backends whose precision, recall and scores arrays are pycocotools' bit for bit; faster-coco-eval's differ from
# them in the last bit here and there (1 ulp, 2.2e-16: its C++ accumulates in another order), its 12 stats by < 1e-15.
BIT_EXACT = {"pycocotools", "ultrafast_pycocotools", "hotcoco"}
CATS = [{"id": 3, "name": "a"}, {"id": 17, "name": "b"}, {"id": 90, "name": "c"}, {"id": 91, "name": "unused"}]


def make_gt(seed: int = 0, n_images: int = 16) -> dict:
    """Images of 320 x 240 with small, medium and large boxes of three classes; a crowd region on
    every fourth image; images 5 and 11 without any annotation."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 320, "height": 240})
        if i in (5, 11):
            continue
        for _ in range(rng.integers(1, 8)):
            w, h = rng.choice([10.0, 40.0, 120.0]) * rng.uniform(0.6, 1.4, 2)
            x, y = rng.uniform(0, 320 - w), rng.uniform(0, 240 - h)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice([3, 17, 90])),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
        if i % 4 == 0:
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 17, "bbox": [0.0, 0.0, 160.0, 120.0],
                         "area": 19200.0, "iscrowd": 1})
    return {"images": images, "annotations": anns, "categories": CATS}


def make_results(gt: dict, seed: int = 1) -> list[dict]:
    """Jittered true positives, duplicates, false positives (also on empty images and inside crowd
    regions), tied scores, and 250 detections on image 1 (more than maxDets = 100)."""
    rng = np.random.default_rng(seed)
    res = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(rng.integers(0, 3)):
            j = rng.normal(0, 0.08, 4) * [w, h, w, h]
            res.append({"image_id": a["image_id"], "category_id": a["category_id"],
                        "bbox": [x + j[0], y + j[1], max(w + j[2], 1.0), max(h + j[3], 1.0)],
                        "score": float(rng.choice([0.5, rng.random()]))})  # some ties at 0.5
    for _ in range(60):
        w, h = rng.uniform(4, 150, 2)
        res.append({"image_id": int(rng.integers(1, 17)), "category_id": int(rng.choice([3, 17, 90])),
                    "bbox": [float(rng.uniform(0, 200)), float(rng.uniform(0, 150)), float(w), float(h)],
                    "score": float(rng.random())})
    for _ in range(250):
        w, h = rng.uniform(4, 100, 2)
        res.append({"image_id": 1, "category_id": int(rng.choice([3, 17, 90])),
                    "bbox": [float(rng.uniform(0, 220)), float(rng.uniform(0, 140)), float(w), float(h)],
                    "score": float(rng.random())})
    return [{**r, "bbox": [float(v) for v in r["bbox"]]} for r in res]


def both(gt: dict, res: list[dict], backend: str, **kw):
    """``evaluate_coco`` with pycocotools and with ``backend`` on copies of the same ground truth and detections."""
    ref = evaluate_coco(coco_from_dict(copy.deepcopy(gt)), copy.deepcopy(res), backend="pycocotools", **kw)
    other = evaluate_coco(coco_from_dict(copy.deepcopy(gt)), copy.deepcopy(res), backend=backend, **kw)
    return ref, other


def assert_same_stats(a: dict, b: dict) -> None:
    for k in STAT_NAMES:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            assert b[k] == pytest.approx(a[k], abs=1e-12), k


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twelve_stats_and_precision_arrays_match(eval_backend, seed):
    """Crowd regions, images without annotations, ties, > 100 detections on an image."""
    gt = make_gt(seed)
    res = make_results(gt, seed + 10)
    assert max(sum(r["image_id"] == i for r in res) for i in range(1, 17)) > 100
    (s_ref, e_ref), (s_fast, e_fast) = both(gt, res, eval_backend)
    assert 0.05 < s_ref["AP"] < 0.95  # a non-trivial fixture
    assert_same_stats(s_ref, s_fast)
    for key in ("precision", "recall", "scores"):
        assert e_fast.eval[key].shape == e_ref.eval[key].shape, key
        np.testing.assert_allclose(e_fast.eval[key], e_ref.eval[key], rtol=0, atol=0 if eval_backend in BIT_EXACT
                                   else 1e-15, err_msg=key)
    names = {c["id"]: c["name"] for c in CATS}
    a, b = per_class_ap(e_ref, names), per_class_ap(e_fast, names)
    assert a.keys() == b.keys() == {"a", "b", "c", "unused"} and a["unused"] is None and b["unused"] is None
    assert b == pytest.approx(a, abs=1e-12) and ap_per_iou(e_fast) == pytest.approx(ap_per_iou(e_ref), abs=1e-12)
    if eval_backend in BIT_EXACT:
        assert a == b and ap_per_iou(e_ref) == ap_per_iou(e_fast)


def test_non_default_max_dets_match(eval_backend):
    gt = make_gt(3)
    (s_ref, e_ref), (s_fast, e_fast) = both(gt, make_results(gt, 4), eval_backend, max_dets=(1, 10, 300))
    assert_same_stats(s_ref, s_fast)
    np.testing.assert_allclose(e_fast.eval["precision"], e_ref.eval["precision"], rtol=0,
                               atol=0 if eval_backend in BIT_EXACT else 1e-15)


def test_no_detections_and_perfect_detections_match(eval_backend):
    gt = make_gt(5)
    (s_ref, _), (s_fast, _) = both(gt, [], eval_backend)
    assert_same_stats(s_ref, s_fast)
    assert s_fast["AP"] == 0.0
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    (s_ref, _), (s_fast, _) = both(gt, perfect, eval_backend)
    assert_same_stats(s_ref, s_fast)
    assert s_fast["AP"] == pytest.approx(1.0)


def test_tide_and_true_positive_ious_match(eval_backend):
    """The analyses of ``eval_detail.json``: TIDE reads the evaluator's ground truth and detections, the true
    positives' IoU its per-image matches (faster-coco-eval keeps none: None, so ``auto`` never picks it)."""
    gt = make_gt(0)
    (_, e_ref), (_, e_fast) = both(gt, make_results(gt, 10), eval_backend)
    assert tide_errors(e_fast) == tide_errors(e_ref)
    ref, got = true_positive_ious(e_ref), true_positive_ious(e_fast)
    if eval_backend == "faster_coco_eval":
        assert got is None and eval_backend not in backends.AUTO
        return
    assert ref.size > 20
    np.testing.assert_array_equal(got, ref)  # the same pairs in the same order, the same float64 IoU


def test_backends_keep_the_input_checks(eval_backend):
    gt = make_gt()
    res = make_results(gt) + [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match="999"):
        evaluate_coco(coco_from_dict(gt), res, backend=eval_backend)


@pytest.mark.parametrize("backend", [b for b in backends.PACKAGES if b != "pycocotools"])
def test_missing_package_is_a_clear_error(monkeypatch, backend):
    monkeypatch.setitem(sys.modules, backend, None)  # import now raises ImportError
    gt = make_gt()
    with pytest.raises(ImportError, match=f"eval.backend={backend} needs the {backends.PACKAGES[backend]} package: uv sync"):
        evaluate_coco(coco_from_dict(gt), make_results(gt), backend=backend)


def test_unknown_backend_is_named():
    gt = make_gt()
    with pytest.raises(ValueError, match="eval.backend.*'detectron2'"):
        evaluate_coco(coco_from_dict(gt), [], backend="detectron2")
    cfg = Config()
    cfg.eval.backend = "detectron2"
    with pytest.raises(ValueError, match=r"eval.backend must be auto\|pycocotools\|ultrafast_pycocotools"):
        check_ranges(cfg)


def test_auto_is_the_first_installed_of_auto_else_pycocotools(monkeypatch):
    """The config's choices are the backends'; ``auto`` (the default) resolves to the fastest installed."""
    assert tuple(EvalBackend) == backends.BACKENDS and Config().eval.backend == "auto"
    assert set(backends.AUTO) < set(backends.PACKAGES) and "faster_coco_eval" not in backends.AUTO
    have = {"hotcoco"}
    monkeypatch.setattr(backends, "installed", lambda b: b in have)
    assert backends.resolve("auto") == "hotcoco" and backends.resolve("pycocotools") == "pycocotools"
    have = {"hotcoco", "ultrafast_pycocotools", "faster_coco_eval"}
    assert backends.resolve("auto") == backends.AUTO[0]
    have = {"faster_coco_eval"}
    assert backends.resolve("auto") == "pycocotools"


def test_backend_label_and_version_name_the_package():
    assert backends.label("pycocotools").startswith("pycocotools 2.")
    assert backends.label("auto").split()[0] == backends.PACKAGES[backends.resolve("auto")]


@pytest.mark.parametrize("case", ["fp_before_tp", "rounded_500_per_image"])
def test_backends_break_tied_scores_by_input_order_as_pycocotools(eval_backend, case):
    """The tie fixtures of ``test_eval_parity``: each backend gives pycocotools' 12 stats on them too."""
    from tests.test_eval_parity import pycocotools_stats, rounded_case, tie_case

    gt, dt = tie_case() if case == "fp_before_tp" else rounded_case(seed=1)
    theirs = pycocotools_stats(gt, dt)
    fast, _ = evaluate_coco(coco_from_dict(copy.deepcopy(gt)), copy.deepcopy(dt), backend=eval_backend)
    for k, v in zip(STAT_NAMES, theirs):
        assert (fast[k] is None) == (v == -1), k
        if v != -1:
            assert fast[k] == pytest.approx(v, abs=1e-12), (k, fast[k], v)
