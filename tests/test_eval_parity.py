"""Evaluation scores the ground truth as given, exactly as pycocotools run directly does, with every backend
(``eval_backend``: each installed one in turn, ``tests/conftest.py``; pycocotools itself too).

Training-time cleaning (boxes clipped to their image, boxes wholly outside dropped) only changes
the boxes the model trains on, never what evaluation scores. What pycocotools would silently
mis-score is an error naming the file, the entry and the value, or an explicit, logged correction
(a GT ``area`` <= 0 is recomputed as ``w * h``, the way a missing area is filled).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detlib.config import Config, EvalConfig, check_ranges
from detlib.data.coco import CocoDetection, coco_from_dict
from detlib.evaluation.coco_eval import STAT_NAMES, evaluate_coco
from detlib.tools import evaluate  # noqa: E402

W, H = 100, 80
CATS = [{"id": 1, "name": "a"}, {"id": 4, "name": "b"}]


def ann(i: int, image_id: int, bbox: list, cat: int = 1, **kw) -> dict:
    return {"id": i, "image_id": image_id, "category_id": cat, "bbox": bbox, "area": bbox[2] * bbox[3],
            "iscrowd": 0, **kw}


def det(image_id: int, bbox: list, score: float, cat: int = 1) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": bbox, "score": score}


def gt_dict(anns: list[dict], n_images: int = 1, cats: list[dict] | None = None) -> dict:
    images = [{"id": i, "file_name": f"{i}.png", "width": W, "height": H} for i in range(1, n_images + 1)]
    return {"info": {}, "images": images, "annotations": anns, "categories": cats or CATS}


def pycocotools_stats(gt: dict, dt: list[dict]) -> list[float]:
    """The 12 stats of pycocotools run directly (COCO, loadRes, evaluate, accumulate, summarize)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(gt)
        coco.createIndex()
        E = COCOeval(coco, coco.loadRes(copy.deepcopy(dt)), "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    return list(E.stats)


def assert_same(ours: dict, theirs: list[float], keys=STAT_NAMES) -> None:
    for k, v in zip(STAT_NAMES, theirs):
        if k in keys:
            assert (ours[k] is None) == (v == -1), (k, ours[k], v)
            if ours[k] is not None:
                assert ours[k] == pytest.approx(v, abs=1e-12), (k, ours[k], v)


def run_file_mode(tmp_path: Path, gt: dict, dt: list[dict], backend: str = "auto") -> tuple[int, dict | None]:
    """``tools/evaluate.py --gt --dt --out --backend``: its exit status and the metrics it wrote."""
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dt.json").write_text(json.dumps(dt))
    out = tmp_path / "metrics.json"
    with contextlib.redirect_stdout(io.StringIO()):
        rc = evaluate.main(["--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json"), "--out", str(out),
                            "--backend", backend])
    return rc, (json.loads(out.read_text()) if rc == 0 else None)


# ---------------------------------------------------------------------------------------------
# Ground truth past the image edge, zero areas, crowd regions: as pycocotools scores the file


@pytest.mark.parametrize("gt_box,dt_box", [
    ([80, 10, 22, 30], [80, 10, 22, 30]),  # 2 px past the right edge, a detection equal to it
    ([-3, -2, 40, 30], [-3, -2, 40, 30]),  # past the top-left corner
    ([60, 50, 60, 40], [62, 51, 55, 38]),  # past two edges, a near hit
])
def test_file_mode_scores_gt_past_the_edge_as_pycocotools(eval_backend, tmp_path, gt_box, dt_box):
    gt = gt_dict([ann(1, 1, gt_box)])
    dt = [det(1, dt_box, 0.9)]
    rc, ours = run_file_mode(tmp_path, gt, dt, eval_backend)
    assert rc == 0
    assert_same(ours, pycocotools_stats(gt, dt))


def test_file_mode_keeps_gt_wholly_outside_the_image_as_pycocotools(eval_backend, tmp_path):
    gt = gt_dict([ann(1, 1, [10, 10, 30, 30]), ann(2, 1, [150, 10, 20, 20])])  # the second is off the image
    dt = [det(1, [10, 10, 30, 30], 0.9)]
    rc, ours = run_file_mode(tmp_path, gt, dt, eval_backend)
    theirs = pycocotools_stats(gt, dt)
    assert rc == 0 and theirs[0] < 0.6  # half the objects are missed
    assert_same(ours, theirs)


def parity_case() -> tuple[dict, list[dict]]:
    """Three images: boxes past every edge, one wholly outside, crowd regions (one past the edge), area 0."""
    anns = [
        ann(1, 1, [5, 5, 30, 25]), ann(2, 1, [82, 10, 20, 30]), ann(3, 1, [40, 60, 40, 30], iscrowd=1),
        ann(4, 1, [50, 20, 20, 20], cat=4), ann(5, 2, [-6, 30, 20, 20]), ann(6, 2, [105, 5, 15, 15]),
        ann(7, 2, [30, 10, 50, 50], area=0), ann(8, 2, [10, 60, 12, 10], cat=4, area=0),
        ann(9, 3, [0, 0, 100, 80], iscrowd=1, area=0), ann(10, 3, [20, -4, 30, 30]), ann(11, 3, [60, 40, 45, 45], cat=4),
    ]
    rng = np.random.default_rng(0)
    dets = []
    for a in anns:
        if a["id"] in (6, 8):
            continue  # missed objects
        x, y, w, h = a["bbox"]
        j = rng.normal(0, 1.5, 4)
        dets.append(det(a["image_id"], [x + j[0], y + j[1], w + j[2], h + j[3]], float(rng.uniform(0.3, 1)),
                        a["category_id"]))
    dets += [det(1, [45, 65, 10, 10], 0.95), det(1, [55, 62, 30, 20], 0.5),  # inside / over the crowd region
             det(2, [60, 5, 10, 10], 0.85), det(3, [70, 10, 20, 20], 0.6, cat=4)]  # false positives
    return gt_dict(anns, n_images=3), dets


def test_file_mode_parity_with_gt_past_the_edge_zero_area_and_crowd_regions(eval_backend, tmp_path, caplog):
    gt, dt = parity_case()
    with caplog.at_level(logging.WARNING):
        rc, ours = run_file_mode(tmp_path, gt, dt, eval_backend)
    assert rc == 0
    # The file as given: the stats over all sizes are pycocotools' on the raw file, to the last bit.
    assert_same(ours, pycocotools_stats(gt, dt), keys=("AP", "AP50", "AP75", "AR1", "AR10", "AR100"))
    # Per size, the logged correction (area 0 -> w * h) is the one difference from the raw file.
    fixed = copy.deepcopy(gt)
    for a in fixed["annotations"]:
        a["area"] = a["area"] or a["bbox"][2] * a["bbox"][3]
    assert_same(ours, pycocotools_stats(fixed, dt))
    assert "area" in caplog.text and "id 7" in caplog.text


def _write_images(root: Path, gt: dict) -> None:
    for im in gt["images"]:
        Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(root / im["file_name"])


def test_val_set_scores_gt_as_given_while_training_boxes_are_clipped(eval_backend, tmp_path):
    gt, dt = parity_case()
    _write_images(tmp_path, gt)
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    ds = CocoDetection(tmp_path / "ann.json", tmp_path, train=False)
    # What evaluation scores (the trainer's and tools/evaluate.py --run's val AP): the boxes as given.
    assert [a["bbox"] for a in ds.coco.dataset["annotations"]] == [a["bbox"] for a in gt["annotations"]]
    fixed = copy.deepcopy(gt)
    for a in fixed["annotations"]:
        a["area"] = a["area"] or a["bbox"][2] * a["bbox"][3]
    stats, _ = evaluate_coco(ds.coco, dt, backend=eval_backend)
    assert_same(stats, pycocotools_stats(fixed, dt))
    # What the model trains on: clipped to the image, the box wholly outside dropped, crowds left out.
    _, target = ds[ds.ids.index(2)]
    assert target["boxes"].tolist() == [[0.0, 30.0, 14.0, 50.0], [30.0, 10.0, 80.0, 60.0], [10.0, 60.0, 22.0, 70.0]]
    assert ds.boxes(1).max(0)[2] <= W and ds.boxes(3)[:, 3].max() <= H


def test_val_set_renumbers_duplicate_annotation_ids_for_evaluation(eval_backend, tmp_path):
    gt = gt_dict([ann(1, 1, [1, 1, 20, 20]), ann(1, 1, [40, 40, 20, 20]), ann(0, 1, [60, 10, 15, 15])])
    _write_images(tmp_path, gt)
    (tmp_path / "ann.json").write_text(json.dumps(gt))
    ds = CocoDetection(tmp_path / "ann.json", tmp_path)
    assert sorted(ds.coco.anns) == [1, 2, 3]
    stats, _ = evaluate_coco(ds.coco, [det(1, a["bbox"], 1.0) for a in gt["annotations"]], backend=eval_backend)
    assert stats["AP"] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# What pycocotools would silently mis-score: an error naming file, entry and value, or a logged fix


@pytest.mark.parametrize("area", [0, 0.0, -12.5])
def test_gt_area_zero_or_negative_is_recomputed_as_w_times_h_with_a_warning(eval_backend, tmp_path, caplog, area):
    gt = gt_dict([ann(1, 1, [10, 10, 30, 30]), ann(7, 1, [50, 10, 40, 40], area=area)])  # 1600 px: medium
    dt = [det(1, [10, 10, 30, 30], 0.9), det(1, [50, 10, 40, 40], 0.8)]
    with caplog.at_level(logging.WARNING):
        rc, ours = run_file_mode(tmp_path, gt, dt, eval_backend)
    assert rc == 0
    fixed = copy.deepcopy(gt)
    fixed["annotations"][1]["area"] = 1600
    assert_same(ours, pycocotools_stats(fixed, dt))
    assert ours["APm"] == pytest.approx(1.0)  # not "small" as the raw area would say
    assert str(tmp_path / "gt.json") in caplog.text and "id 7" in caplog.text and f"area {area!r}" in caplog.text


@pytest.mark.parametrize("area,shown", [("1600", "'1600'"), (None, "None"), (True, "True"), ([1600], "[1600]"),
                                        (float("nan"), "nan"), (float("inf"), "inf")])
def test_gt_area_not_a_finite_number_is_an_error_naming_file_id_value(tmp_path, capsys, area, shown):
    gt = gt_dict([ann(1, 1, [10, 10, 30, 30]), ann(7, 1, [50, 10, 40, 40], area=area)])
    rc, _ = run_file_mode(tmp_path, gt, [det(1, [10, 10, 30, 30], 0.9)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    assert f"{tmp_path / 'gt.json'}: annotation id 7: field 'area'" in err and shown in err


@pytest.mark.parametrize("bbox", [[60, 10, -20, 20], [60, 10, 20, -5], [60, 10, 0, 20], [60, 10, 20, 0]])
def test_file_mode_detection_with_non_positive_width_or_height_is_an_error(tmp_path, capsys, bbox):
    gt = gt_dict([ann(1, 1, [10, 10, 30, 30])])
    rc, _ = run_file_mode(tmp_path, gt, [det(1, [10, 10, 30, 30], 0.5), det(1, bbox, 0.9)])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"evaluate.py: error: {tmp_path / 'dt.json'}: entry 1: field 'bbox'" in err and str(bbox) in err


def test_evaluate_coco_refuses_detections_with_non_positive_width_or_height():
    gt = coco_from_dict(gt_dict([ann(1, 1, [10, 10, 30, 30])]))
    with pytest.raises(ValueError, match=r"detection 1 .*width or height <= 0.*\[60, 10, -20, 20\]"):
        evaluate_coco(gt, [det(1, [10, 10, 30, 30], 0.5), det(1, [60, 10, -20, 20], 0.9)])


def test_duplicate_category_ids_are_an_error_naming_file_and_id(tmp_path, capsys):
    cats = [{"id": 1, "name": "a"}, {"id": 4, "name": "b"}, {"id": 1, "name": "a again"}]
    rc, _ = run_file_mode(tmp_path, gt_dict([ann(1, 1, [10, 10, 30, 30])], cats=cats), [det(1, [10, 10, 30, 30], 0.9)])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path / 'gt.json'}: duplicate category id 1" in err and "Traceback" not in err


@pytest.mark.parametrize("max_dets", [[-1, 10, 100], [0, 10, 100], [1, 10, 10], [10, 1, 100], [1, 10]])
def test_eval_max_dets_must_be_three_strictly_increasing_positive_numbers(max_dets):
    with pytest.raises(ValueError, match=r"config: eval.max_dets must be .*" + str(max_dets).replace("[", r"\[")):
        check_ranges(Config(eval=EvalConfig(max_dets=max_dets)))
    gt = coco_from_dict(gt_dict([ann(1, 1, [10, 10, 30, 30])]))
    if max_dets[0] <= 0:  # the library call refuses it too, rather than pycocotools' dets[:-1]
        with pytest.raises(ValueError, match="max_dets"):
            evaluate_coco(gt, [det(1, [10, 10, 30, 30], 0.9)], max_dets=max_dets)


# ---------------------------------------------------------------------------------------------
# Tied scores: scored in the order given, as pycocotools' stable sort does


def tie_case() -> tuple[dict, list[dict]]:
    """One object; a false positive listed before the true positive at the same score (pycocotools: AP 0.5)."""
    return gt_dict([ann(1, 1, [10, 10, 20, 20])]), [det(1, [60, 50, 10, 10], 0.9), det(1, [10, 10, 20, 20], 0.9)]


def rounded_case(seed: int = 0, n_images: int = 4, per_image: int = 500) -> tuple[dict, list[dict]]:
    """``per_image`` detections per image (beyond maxDets 100) with scores rounded to 2 decimals (many ties),
    jittered copies of the objects among them, in a shuffled file order."""
    rng = np.random.default_rng(seed)
    anns, dets = [], []
    for i in range(1, n_images + 1):
        for _ in range(12):
            w, h = rng.choice([6.0, 20.0, 50.0]) * rng.uniform(0.7, 1.3, 2)
            box = [float(rng.uniform(0, W - w)), float(rng.uniform(0, H - h)), float(w), float(h)]
            anns.append(ann(len(anns) + 1, i, box, cat=int(rng.choice([1, 4]))))
        mine = [a for a in anns if a["image_id"] == i]
        for k in range(per_image):
            a = mine[k % len(mine)]
            x, y, w, h = a["bbox"]
            near = k < 4 * len(mine)  # four jittered copies of each object, then clutter
            j = rng.normal(0, 0.15, 4) * [w, h, w, h] if near else rng.uniform(0, 30, 4)
            score = rng.uniform(0.4, 1.0) if near else rng.uniform(0.0, 0.7)
            dets.append(det(i, [float(x + j[0]), float(y + j[1]), float(max(w + j[2], 1)), float(max(h + j[3], 1))],
                            round(float(score), 2), a["category_id"]))
    order = rng.permutation(len(dets))
    return gt_dict(anns, n_images=n_images), [dets[k] for k in order]


def test_tied_scores_fp_listed_before_tp_score_ap_half_as_pycocotools(eval_backend, tmp_path):
    gt, dt = tie_case()
    theirs = pycocotools_stats(gt, dt)
    assert theirs[0] == pytest.approx(0.5)
    ours, _ = evaluate_coco(coco_from_dict(gt), copy.deepcopy(dt), backend=eval_backend)
    assert_same(ours, theirs)
    rc, file_mode = run_file_mode(tmp_path, gt, dt, eval_backend)  # tools/evaluate.py --gt --dt keeps the file's order
    assert rc == 0
    assert_same(file_mode, theirs)


def test_rounded_scores_beyond_max_dets_give_pycocotools_twelve_stats(eval_backend, tmp_path):
    gt, dt = rounded_case()
    theirs = pycocotools_stats(gt, dt)
    assert 0.05 < theirs[0] < 0.95 and len({d["score"] for d in dt}) <= 101  # ties everywhere
    ours, _ = evaluate_coco(coco_from_dict(gt), copy.deepcopy(dt), backend=eval_backend)
    assert_same(ours, theirs)
    rc, file_mode = run_file_mode(tmp_path, gt, dt, eval_backend)
    assert rc == 0
    assert_same(file_mode, theirs)


def test_file_mode_scores_images_without_width_height_or_file_name_as_pycocotools(eval_backend, tmp_path):
    """pycocotools reads only the image ids; ``--gt --dt`` asks no more."""
    gt, dt = tie_case()
    gt["images"] = [{"id": 1}, {"id": 2, "file_name": ""}]
    gt["annotations"].append(ann(2, 2, [30, 30, 20, 20]))
    dt = dt + [det(2, [31, 30, 20, 20], 0.7)]
    rc, ours = run_file_mode(tmp_path, gt, dt, eval_backend)
    assert rc == 0
    assert_same(ours, pycocotools_stats(gt, dt))
