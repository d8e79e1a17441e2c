"""Pascal VOC box AP at IoU 0.5, as VOC's own ``voc_eval.py`` computes it (py-faster-rcnn, detectron2).

VOC users compare with the VOC2007 11-point AP50, which differs from COCO's AP50 (101-point
interpolation, crowd matching). Rules, per class over the whole split:

- detections sorted by score (ties broken by image id, then box, so the order is deterministic);
- each detection takes the ground truth of its image and class with the highest IoU; IoU > 0.5
  (strictly) and that object not yet taken: true positive; already taken: false positive;
  IoU <= 0.5: false positive;
- a detection whose best match is a *difficult* object counts as neither; difficult objects are
  not in the number of positives;
- 11-point AP: mean over recall thresholds 0, 0.1, ..., 1 of the highest precision at recall >= t.

Boxes are continuous xyxy (VOC's 1-based ``[xmin, ymin, xmax, ymax]`` read as ``[xmin-1, ymin-1,
xmax, ymax]``), so IoU here equals VOC's ``+1`` pixel arithmetic on the original numbers.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from pycocotools.coco import COCO

IOU_THRESH = 0.5


def _iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of ``box (4,)`` with each of ``boxes (G, 4)``, xyxy -> ``(G,)``."""
    lt, rb = np.maximum(box[:2], boxes[:, :2]), np.minimum(box[2:], boxes[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    union = (box[2:] - box[:2]).prod() + (boxes[:, 2:] - boxes[:, :2]).prod(1) - inter
    return inter / np.maximum(union, 1e-12)


def ap_from_pr(recall: np.ndarray, precision: np.ndarray, metric: str = "11point") -> float:
    """AP from the cumulative recall/precision curve: VOC07 11-point, or VOC2010+ ``area`` under the envelope."""
    if metric == "11point":
        return float(sum(precision[recall >= t].max(initial=0.0) for t in np.linspace(0, 1, 11)) / 11)
    if metric != "area":
        raise ValueError(f"metric must be '11point' or 'area', got {metric!r}")
    r = np.concatenate([[0.0], recall, [1.0]])
    p = np.concatenate([[0.0], precision, [0.0]])
    p = np.maximum.accumulate(p[::-1])[::-1]
    steps = np.where(r[1:] != r[:-1])[0]
    return float(((r[steps + 1] - r[steps]) * p[steps + 1]).sum())


def class_ap(
    dets: list[dict], gt: dict[int, tuple[np.ndarray, np.ndarray]], metric: str = "11point"
) -> float | None:
    """AP50 of one class. ``dets``: COCO results of that class; ``gt``: image id -> ``(boxes (G, 4) xyxy,
    difficult (G,) bool)``. ``None`` when the class has no non-difficult object."""
    npos = int(sum((~d).sum() for _, d in gt.values()))
    if npos == 0:
        return None
    dets = sorted(dets, key=lambda r: (-r["score"], r["image_id"], tuple(r["bbox"])))
    taken = {i: np.zeros(len(b), bool) for i, (b, _) in gt.items()}
    tp, fp = np.zeros(len(dets)), np.zeros(len(dets))
    for k, r in enumerate(dets):
        x, y, w, h = r["bbox"]
        boxes, difficult = gt.get(r["image_id"], (np.zeros((0, 4)), np.zeros(0, bool)))
        if len(boxes) == 0:
            fp[k] = 1
            continue
        ious = _iou(np.array([x, y, x + w, y + h]), boxes)
        j = int(ious.argmax())
        if ious[j] <= IOU_THRESH:
            fp[k] = 1
        elif difficult[j]:
            continue
        elif not taken[r["image_id"]][j]:
            tp[k], taken[r["image_id"]][j] = 1, True
        else:
            fp[k] = 1
    tp, fp = np.cumsum(tp), np.cumsum(fp)
    recall = tp / npos
    precision = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
    return ap_from_pr(recall, precision, metric)


def voc07_ap50(results: list[dict], coco_gt: COCO, metric: str = "11point") -> dict:
    """VOC AP50 of COCO-format ``results`` (``image_id``, ``category_id``, ``bbox`` xywh, ``score``).

    Difficult objects are annotations with ``difficult = 1`` (or, lacking that field, ``iscrowd = 1``).
    Returns ``{"mAP": mean over classes with objects (None if none), "per_class": {name: AP or None}}``;
    AP values are floats in [0, 1].
    """
    grouped: dict[int, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for a in coco_gt.dataset["annotations"]:
        grouped[a["category_id"]][a["image_id"]].append(a)
    gt_by_cat: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = defaultdict(dict)
    for cat, by_image in grouped.items():
        for image_id, anns in by_image.items():
            xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
            difficult = np.array([bool(a.get("difficult", a.get("iscrowd", 0))) for a in anns])
            gt_by_cat[cat][image_id] = (np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1), difficult)
    dets_by_cat: dict[int, list[dict]] = defaultdict(list)
    for r in results:
        dets_by_cat[r["category_id"]].append(r)
    per_class = {}
    for cat in coco_gt.getCatIds():
        per_class[coco_gt.cats[cat]["name"]] = class_ap(dets_by_cat[cat], gt_by_cat[cat], metric)
    valid = [v for v in per_class.values() if v is not None]
    return {"mAP": float(np.mean(valid)) if valid else None, "per_class": per_class}
