"""``eval.backend``: faster-coco-eval gives pycocotools' numbers, down to the precision arrays."""

from __future__ import annotations

import copy
import importlib.util
import sys

import numpy as np
import pytest

from detlib.config import Config, check_ranges
from detlib.data.coco import coco_from_dict
from detlib.evaluation.coco_eval import STAT_NAMES, ap_per_iou, evaluate_coco, per_class_ap

HAS_FAST = importlib.util.find_spec("faster_coco_eval") is not None
needs_fast = pytest.mark.skipif(
    not HAS_FAST, reason="faster-coco-eval is not installed (it is in the dev group: uv sync; or --extra fast-eval)")

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


def both(gt: dict, res: list[dict], **kw):
    ref = evaluate_coco(coco_from_dict(copy.deepcopy(gt)), copy.deepcopy(res), backend="pycocotools", **kw)
    fast = evaluate_coco(coco_from_dict(copy.deepcopy(gt)), copy.deepcopy(res), backend="faster_coco_eval", **kw)
    return ref, fast


def assert_same_stats(a: dict, b: dict) -> None:
    for k in STAT_NAMES:
        assert (a[k] is None) == (b[k] is None), k
        if a[k] is not None:
            assert b[k] == pytest.approx(a[k], abs=1e-6), k


@needs_fast
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_twelve_stats_and_precision_arrays_match(seed):
    gt = make_gt(seed)
    res = make_results(gt, seed + 10)
    assert max(sum(r["image_id"] == i for r in res) for i in range(1, 17)) > 100
    (s_ref, e_ref), (s_fast, e_fast) = both(gt, res)
    assert 0.05 < s_ref["AP"] < 0.95  # a non-trivial fixture
    assert_same_stats(s_ref, s_fast)
    for key in ("precision", "recall"):
        assert e_fast.eval[key].shape == e_ref.eval[key].shape, key
        np.testing.assert_allclose(e_fast.eval[key], e_ref.eval[key], atol=1e-6, err_msg=key)
    names = {c["id"]: c["name"] for c in CATS}
    a, b = per_class_ap(e_ref, names), per_class_ap(e_fast, names)
    assert a.keys() == b.keys() == {"a", "b", "c", "unused"} and a["unused"] is None and b["unused"] is None
    assert all(b[k] == pytest.approx(a[k], abs=1e-6) for k in ("a", "b", "c"))
    a, b = ap_per_iou(e_ref), ap_per_iou(e_fast)
    assert a.keys() == b.keys() and all(b[k] == pytest.approx(a[k], abs=1e-6) for k in a)


@needs_fast
def test_non_default_max_dets_match():
    gt = make_gt(3)
    (s_ref, _), (s_fast, _) = both(gt, make_results(gt, 4), max_dets=(1, 10, 300))
    assert_same_stats(s_ref, s_fast)


@needs_fast
def test_no_detections_and_perfect_detections_match():
    gt = make_gt(5)
    (s_ref, _), (s_fast, _) = both(gt, [])
    assert_same_stats(s_ref, s_fast)
    assert s_fast["AP"] == 0.0
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in gt["annotations"] if not a["iscrowd"]]
    (s_ref, _), (s_fast, _) = both(gt, perfect)
    assert_same_stats(s_ref, s_fast)
    assert s_fast["AP"] == pytest.approx(1.0)


@needs_fast
def test_fast_backend_keeps_the_input_checks():
    gt = make_gt()
    res = make_results(gt) + [{"image_id": 999, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(ValueError, match="999"):
        evaluate_coco(coco_from_dict(gt), res, backend="faster_coco_eval")


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faster_coco_eval", None)  # import now raises ImportError
    gt = make_gt()
    with pytest.raises(ImportError, match="uv sync --extra fast-eval"):
        evaluate_coco(coco_from_dict(gt), make_results(gt), backend="faster_coco_eval")


def test_unknown_backend_is_named():
    gt = make_gt()
    with pytest.raises(ValueError, match="eval.backend.*'detectron2'"):
        evaluate_coco(coco_from_dict(gt), [], backend="detectron2")
    cfg = Config()
    cfg.eval.backend = "detectron2"
    with pytest.raises(ValueError, match="eval.backend must be pycocotools|faster_coco_eval"):
        check_ranges(cfg)


@needs_fast
@pytest.mark.parametrize("case", ["fp_before_tp", "rounded_500_per_image"])
def test_fast_backend_breaks_tied_scores_by_input_order_as_pycocotools(case):
    """The tie fixtures of ``test_eval_parity``: faster-coco-eval gives pycocotools' 12 stats on them too."""
    from tests.test_eval_parity import pycocotools_stats, rounded_case, tie_case

    gt, dt = tie_case() if case == "fp_before_tp" else rounded_case(seed=1)
    theirs = pycocotools_stats(gt, dt)
    fast, _ = evaluate_coco(coco_from_dict(copy.deepcopy(gt)), copy.deepcopy(dt), backend="faster_coco_eval")
    for k, v in zip(STAT_NAMES, theirs):
        assert (fast[k] is None) == (v == -1), k
        if v != -1:
            assert fast[k] == pytest.approx(v, abs=1e-6), (k, fast[k], v)
