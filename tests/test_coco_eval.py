"""Evaluation against pycocotools run directly, and the inputs pycocotools gets silently wrong."""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detlib.data.coco import coco_from_dict
from detlib.evaluation.coco_eval import STAT_NAMES, evaluate_coco, per_class_ap, to_coco_results

CATS = [{"id": 3, "name": "a"}, {"id": 17, "name": "b"}, {"id": 90, "name": "c"}]  # non-contiguous


def make_gt(n_images=12, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for i in range(1, n_images + 1):
        images.append({"id": i, "file_name": f"{i}.png", "width": 200, "height": 200})
        for _ in range(rng.integers(1, 5)):
            x, y = rng.uniform(0, 120, 2)
            w, h = rng.uniform(8, 80, 2)
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(rng.choice([3, 17, 90])),
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h), "iscrowd": 0})
    return {"images": images, "annotations": anns, "categories": CATS}


def noisy_results(gt: dict, seed=1, drop=0.2) -> list[dict]:
    rng = np.random.default_rng(seed)
    res = []
    for a in gt["annotations"]:
        if rng.random() < drop:
            continue
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 4, 4)
        res.append({"image_id": a["image_id"], "category_id": a["category_id"],
                    "bbox": [x + j[0], y + j[1], max(w + j[2], 1), max(h + j[3], 1)], "score": float(rng.random())})
    for _i in range(20):  # false positives
        res.append({"image_id": int(rng.integers(1, 13)), "category_id": 17,
                    "bbox": [float(v) for v in rng.uniform(0, 100, 4)], "score": float(rng.random())})
    return res


def pycocotools_stats(gt: dict, res: list[dict]) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        E = COCOeval(coco, coco.loadRes(copy.deepcopy(res)), "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats


def test_matches_pycocotools_run_directly():
    gt = make_gt()
    res = noisy_results(gt)
    ours, _ = evaluate_coco(coco_from_dict(copy.deepcopy(gt)), res)
    ref = pycocotools_stats(gt, res)
    for k, r in zip(STAT_NAMES, ref):
        assert (ours[k] is None and r == -1) or ours[k] == pytest.approx(r, abs=1e-12), k


def test_perfect_predictions_give_ap_one():
    gt = make_gt()
    res = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
           for a in gt["annotations"]]
    stats, _ = evaluate_coco(coco_from_dict(gt), res)
    assert stats["AP"] == pytest.approx(1.0) and stats["AP75"] == pytest.approx(1.0)


def test_label_category_round_trip_with_non_contiguous_ids():
    gt = make_gt()
    label_to_cat = {1: 3, 2: 17, 3: 90}
    cat_to_label = {c: lab for lab, c in label_to_cat.items()}
    dets, ids = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        xyxy = torch.tensor([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                             for a in anns])
        dets.append({"boxes": xyxy, "scores": torch.ones(len(anns)),
                     "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns])})
        ids.append(img["id"])
    res = to_coco_results(dets, ids, label_to_cat)
    assert sorted(r["category_id"] for r in res) == sorted(a["category_id"] for a in gt["annotations"])
    for r, a in zip(sorted(res, key=lambda r: r["bbox"]), sorted(gt["annotations"], key=lambda a: a["bbox"])):
        np.testing.assert_allclose(r["bbox"], a["bbox"], atol=1e-4)  # xyxy -> xywh exactly
    stats, _ = evaluate_coco(coco_from_dict(gt), res)
    assert stats["AP"] == pytest.approx(1.0)


def test_no_detections_gives_zero_with_warning(caplog):
    gt = make_gt()
    stats, _ = evaluate_coco(coco_from_dict(gt), [])
    assert stats["AP"] == 0.0 and stats["AR100"] == 0.0
    assert "no detections" in caplog.text


def test_unknown_image_id_is_named():
    gt = make_gt()
    res = noisy_results(gt)
    res.append({"image_id": 999, "category_id": 3, "bbox": [0, 0, 5, 5], "score": 0.5})
    with pytest.raises(ValueError, match="999"):
        evaluate_coco(coco_from_dict(gt), res)


def test_missing_sizes_are_none_not_minus_one():
    gt = make_gt()
    for a in gt["annotations"]:  # only medium objects: small and large have no ground truth
        a["bbox"][2] = a["bbox"][3] = 50.0
        a["area"] = 2500.0
    res = noisy_results(gt)
    stats, _ = evaluate_coco(coco_from_dict(gt), res)
    assert stats["APs"] is None and stats["APl"] is None and stats["ARs"] is None
    assert isinstance(stats["APm"], float)


def test_non_default_max_dets_never_gives_minus_one():
    gt = make_gt()
    stats, _ = evaluate_coco(coco_from_dict(gt), noisy_results(gt), max_dets=(1, 10, 300))
    default, _ = evaluate_coco(coco_from_dict(gt), noisy_results(gt))
    assert all(v is None or v >= 0 for v in stats.values())
    assert [k for k, v in stats.items() if v is None] == [k for k, v in default.items() if v is None] == ["APl", "ARl"]


def test_tied_scores_are_scored_in_the_given_order_as_pycocotools():
    """pycocotools' sort by score is stable: among ties the input order decides, and so it does here."""
    gt = make_gt()
    res = noisy_results(gt)
    for r in res:
        r["score"] = 0.5
    for order in (res, list(reversed(res))):
        ours, _ = evaluate_coco(coco_from_dict(gt), copy.deepcopy(order))
        theirs = pycocotools_stats(gt, order)
        assert [-1.0 if ours[k] is None else ours[k] for k in STAT_NAMES] == pytest.approx(list(theirs), abs=1e-12)


def test_per_class_ap_names_categories():
    gt = make_gt()
    _, E = evaluate_coco(coco_from_dict(gt), noisy_results(gt))
    per = per_class_ap(E, {c["id"]: c["name"] for c in CATS})
    assert set(per) == {"a", "b", "c"}
