"""COCO box evaluation, pycocotools' numbers, guarded against the inputs pycocotools gets silently wrong.

Every backend gives the same numbers (``detlib.evaluation.backends``: pycocotools, the reference;
ultrafast-pycocotools and hotcoco, Rust ports; faster-coco-eval, a C++ port; ``auto``, the default, the
fastest installed). Each leaves ``E.eval["precision"]`` ``(T, R, K, A, M)`` and ``E.params``, which everything
below reads.

Before any backend runs: detections whose image is not in the ground truth are an error naming the
ids, and so is a detection box with width or height <= 0 (pycocotools would silently ignore one
with a negative side); ``max_dets`` must be strictly increasing positive numbers (pycocotools reads
-1 as "all but the last"); an empty detection list gives AP 0 with a warning instead of
``loadRes([])``'s crash. Results are scored in the order given, never re-sorted: pycocotools' sort by
score is stable, so the order of tied scores is part of the input (a file is scored as pycocotools
scores it; training-time evaluation fixes a deterministic order and writes its detections file in
that order, see ``detlib.evaluation.inference``). After it runs: COCO's -1 ("no such objects") becomes ``None``, and the 12
stats are read from the ``precision``/``recall`` arrays at the configured ``maxDets``, so
non-default maxDets never give a silent -1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detlib.evaluation import backends

log = logging.getLogger(__name__)

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def to_coco_results(
    detections: Sequence[dict], image_ids: Sequence[int], label_to_cat: dict[int, int]
) -> list[dict]:
    """Model outputs (``boxes (D, 4)`` xyxy, ``scores``, ``labels`` 1..K-1) -> COCO results (xywh, category ids)."""
    import torch  # here, so that scoring files (tools/evaluate.py --gt --dt) never imports torch

    results = []
    lut = torch.zeros(max(label_to_cat) + 1, dtype=torch.int64)
    for label, cat in label_to_cat.items():
        lut[label] = cat
    for det, image_id in zip(detections, image_ids):
        boxes = det["boxes"].detach().float().cpu()
        if boxes.numel() == 0:
            continue
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
        cats = lut[det["labels"].cpu()].tolist()
        for box, score, cat in zip(xywh, det["scores"].float().cpu().tolist(), cats):
            results.append({"image_id": int(image_id), "category_id": cat, "bbox": box, "score": score})
    return results


def check_results(gt: COCO, results: list[dict]) -> np.ndarray:
    """Refuse detections that pycocotools would mis-score or crash on; errors name the ids. Returns the
    detections as ``rows`` ``(N, 7)`` float64 ``[image_id, x, y, w, h, score, category_id]`` (``loadRes``' array)."""
    image_ids, cat_ids = list(map(itemgetter("image_id"), results)), list(map(itemgetter("category_id"), results))
    unknown = sorted(set(image_ids) - set(gt.getImgIds()))
    if unknown:
        raise ValueError(f"detections name image ids not in the ground truth: {unknown[:10]} ({len(unknown)} ids)")
    cats = sorted(set(cat_ids) - set(gt.getCatIds()))
    if cats:
        raise ValueError(f"detections name category ids not in the ground truth: {cats[:10]}")
    n = len(results)
    try:  # vectorised checks; the per-detection scans below only run to name what is wrong
        boxes = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(n, 4)
        scores = np.array([r["score"] for r in results], dtype=np.float64).reshape(n)
        ok = bool(np.isfinite(boxes).all() and np.isfinite(scores).all())
    except (KeyError, TypeError, ValueError):
        ok = False
    if not ok:
        bad = [r for r in results if len(r.get("bbox", ())) != 4 or not np.isfinite(r["bbox"]).all()
               or not np.isfinite(r.get("score", np.nan))]
        raise ValueError(f"{len(bad)} detections have a bad bbox or score, first: {bad[0] if bad else results[0]}")
    if n and not (boxes[:, 2:4] > 0).all():  # pycocotools ignores a negative side, mis-sizes a zero one
        i = int(np.flatnonzero((boxes[:, 2:4] <= 0).any(1))[0])
        r = results[i]
        raise ValueError(f"detection {i} (image_id {r['image_id']}, category_id {r['category_id']}) has bbox "
                         f"width or height <= 0: {list(r['bbox'])}")
    ids = np.array([image_ids, cat_ids], dtype=np.float64).reshape(2, n)
    return np.column_stack([ids[0], boxes, scores, ids[1]])


def check_max_dets(max_dets: Sequence[int]) -> list[int]:
    """``max_dets`` as a list; an error unless strictly increasing positive integers (pycocotools reads -1
    as "all but the last detection" and 0 as "none")."""
    m = list(max_dets)
    if (not m or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in m)
            or any(b <= a for a, b in zip(m, m[1:]))):
        raise ValueError(f"max_dets must be strictly increasing positive integers, got {m!r}")
    return [int(v) for v in m]


def summarize(E: COCOeval) -> dict[str, float | None]:
    """The 12 COCO stats from an evaluated ``COCOeval``; -1 ("no such objects") becomes None.

    Same arithmetic as ``COCOeval.summarize`` but indexed by the configured ``maxDets``
    (AP at the largest; AR1/AR10/AR100 at the first three), so custom maxDets don't give -1.
    """
    p = E.params
    prec, rec = E.eval["precision"], E.eval["recall"]  # (T, R, K, A, M), (T, K, A, M)
    areas = {a: i for i, a in enumerate(p.areaRngLbl)}
    top = len(p.maxDets) - 1
    t50, t75 = (iou_index(E, v) for v in (0.5, 0.75))

    def mean(x: np.ndarray) -> float | None:
        x = x[x > -1]
        return float(np.mean(x)) if x.size else None

    def ap(area: str = "all", t: int | None = None) -> float | None:
        s = prec[:, :, :, areas[area], top]
        return mean(s if t is None else s[t])

    def ar(m: int, area: str = "all") -> float | None:
        return mean(rec[:, :, areas[area], m])

    m = [min(i, top) for i in range(3)]
    values = [ap(), ap(t=t50), ap(t=t75), ap("small"), ap("medium"), ap("large"),
              ar(m[0]), ar(m[1]), ar(m[2]), ar(top, "small"), ar(top, "medium"), ar(top, "large")]
    return dict(zip(STAT_NAMES, values))


def iou_index(E: Any, iou: float) -> int:
    """Index of the IoU threshold nearest ``iou`` in ``E.params.iouThrs`` (an array or, hotcoco's, a list)."""
    return int(np.argmin(np.abs(np.asarray(E.params.iouThrs, dtype=np.float64) - iou)))


def evaluate_coco(
    gt: COCO, results: list[dict], max_dets: Sequence[int] = (1, 10, 100), backend: str = "auto"
) -> tuple[dict[str, float | None], Any]:
    """Box AP of COCO-format ``results`` against ``gt``: the 12 stats (floats in [0, 1] or None) and the COCOeval.

    ``gt``: a pycocotools ``COCO``. ``backend``: one of ``backends.BACKENDS`` (``auto``: the fastest installed;
    the same numbers; the returned evaluator is that backend's, with the same ``eval`` and ``params``).
    """
    backend = backends.resolve(backend)
    max_dets = check_max_dets(max_dets)
    rows = check_results(gt, results)
    if not results:
        log.warning("no detections at all: every AP is 0")
    # No re-sorting: COCOeval's sorts by score are stable, so among tied scores the given order decides
    # which detection matches first. Scored in that order, a results file gets pycocotools' numbers;
    # training-time evaluation fixes its own deterministic order (``inference.evaluate``) and writes that.
    E = backends.evaluate(backend, gt, results, rows, max_dets)
    stats = summarize(E)
    if not results:  # AP is 0 (not None) wherever ground truth exists
        stats = {k: (0.0 if v is not None else None) for k, v in stats.items()}
    return stats, E


def per_class_ap(E: Any, names: dict[int, str]) -> dict[str, float | None]:
    """AP@[.5:.95] per category (area all, largest maxDets), keyed by category name."""
    prec = E.eval["precision"][:, :, :, 0, -1]
    out = {}
    for k, cat in enumerate(E.params.catIds):
        x = prec[:, :, k]
        x = x[x > -1]
        out[names.get(int(cat), str(cat))] = float(x.mean()) if x.size else None
    return out


def ap_per_iou(E: Any) -> dict[str, float | None]:
    """AP at each IoU threshold 0.50 ... 0.95 (area all, largest maxDets), keyed ``"0.50"`` ..."""
    prec = E.eval["precision"][:, :, :, 0, -1]
    out = {}
    for t, thr in enumerate(E.params.iouThrs):
        x = prec[t]
        x = x[x > -1]
        out[f"{thr:.2f}"] = float(x.mean()) if x.size else None
    return out


def format_table(stats: dict[str, float | None], title: str = "COCO box evaluation") -> str:
    """The 12 stats as a small text table."""
    labels = {
        "AP": "AP @[.50:.95]", "AP50": "AP @.50", "AP75": "AP @.75", "APs": "AP small", "APm": "AP medium",
        "APl": "AP large", "AR1": "AR maxDets 1", "AR10": "AR maxDets 10", "AR100": "AR maxDets 100",
        "ARs": "AR small", "ARm": "AR medium", "ARl": "AR large",
    }
    lines = [title, "-" * 28]
    for k in STAT_NAMES:
        v = stats.get(k)
        lines.append(f"{labels[k]:<16}{k:>6}  " + ("   n/a" if v is None else f"{v:6.3f}"))
    return "\n".join(lines)


def true_positive_ious(E: Any, iou_thr: float = 0.5) -> np.ndarray | None:
    """IoU of every true positive with the ground truth it was matched to, at the IoU threshold ``iou_thr``
    (area all, largest maxDets), in pycocotools' order (category, image, score): a loss that localises better
    moves this distribution right. None where the backend keeps no per-image matches (faster-coco-eval)."""
    t = iou_index(E, iou_thr)
    backend = backends.backend_of(E)
    if backend == "ultrafast_pycocotools":  # its own per-detection matches, in pycocotools' order
        return np.asarray(E.matches(iou_thr=float(E.params.iouThrs[t]), area="all")["iou"], dtype=float)
    if backend == "hotcoco":
        return _hotcoco_tp_ious(E, float(E.params.iouThrs[t]))
    evals, ious = getattr(E, "evalImgs", None), getattr(E, "ious", None)
    if backend != "pycocotools" or not isinstance(evals, list) or not isinstance(ious, dict):
        return None
    area_all, out = list(E.params.areaRng[0]), []
    for e in evals:
        if e is None or list(e["aRng"]) != area_all or not len(e["dtIds"]):
            continue
        matches, ignored = e["dtMatches"][t], e["dtIgnore"][t]
        iou = ious[e["image_id"], e["category_id"]]  # (detections by score, ground truth in _gts order)
        gt_ids = [g["id"] for g in E._gts[e["image_id"], e["category_id"]]]
        out += [iou[d, gt_ids.index(int(g))] for d, g in enumerate(matches) if g > 0 and not ignored[d]]
    return np.asarray(out, dtype=float)


def _hotcoco_tp_ious(E: Any, iou_thr: float) -> np.ndarray:
    """hotcoco's matches at one threshold (area all, largest maxDets) from a second ``evaluate`` restricted to
    them (its ``evalImgs`` are slow to read back: a quarter as many, one threshold), and pycocotools' box IoU
    (``maskApi.c`` ``bbIou``, the same float64 operations) of each matched pair."""
    import hotcoco as hc  # only ever reached with an evaluator that hotcoco made
    p = E.params
    R = hc.COCOeval(E.cocoGt, E.cocoDt, "bbox")
    R.params.imgIds, R.params.catIds = p.imgIds, p.catIds
    R.params.areaRng, R.params.areaRngLbl = [p.areaRng[0]], ["all"]
    R.params.maxDets, R.params.iouThrs = [p.maxDets[-1]], [iou_thr]
    R.evaluate()
    cat_pos, img_pos = {c: i for i, c in enumerate(p.catIds)}, {m: i for i, m in enumerate(p.imgIds)}
    evals = sorted((e for e in R.evalImgs if e is not None),  # pycocotools' order: category, then image
                   key=lambda e: (cat_pos[e["category_id"]], img_pos[e["image_id"]]))
    pairs = [(d, g) for e in evals for d, g, ign in zip(e["dtIds"], e["dtMatches"][0], e["dtIgnore"][0])
             if g > 0 and not ign]
    if not pairs:
        return np.zeros(0)
    gt_box = {a["id"]: a["bbox"] for a in R.cocoGt.dataset["annotations"]}
    dt_box = {a["id"]: a["bbox"] for a in R.cocoDt.dataset["annotations"]}
    D = np.array([dt_box[d] for d, _ in pairs], dtype=np.float64)
    G = np.array([gt_box[int(g)] for _, g in pairs], dtype=np.float64)
    w = np.minimum(D[:, 2] + D[:, 0], G[:, 2] + G[:, 0]) - np.maximum(D[:, 0], G[:, 0])
    h = np.minimum(D[:, 3] + D[:, 1], G[:, 3] + G[:, 1]) - np.maximum(D[:, 1], G[:, 1])
    inter = w * h
    return inter / (D[:, 2] * D[:, 3] + G[:, 2] * G[:, 3] - inter)
