"""The files an evaluation leaves, written the same way by the trainer and ``tools/evaluate.py``.

* ``metrics.json``: the 12 COCO stats, keys ``STAT_NAMES`` in order (``metrics``).
* ``eval_detail.json``: ``{iteration, stats, val_losses, ap_per_iou, per_class_ap, tide, tp_iou, eval_settings,
  **extra}`` (``eval_detail``): ``tide`` the TIDE error decomposition (``detlib.evaluation.tide``), ``tp_iou``
  the true positives' IoU distribution; ``compare_runs.py`` reads ``ap_per_iou``, ``stats``, ``tide``, ``tp_iou``.
* ``detections.json``: the detections that evaluation scored, a COCO results file in the scored order
  (``tools/evaluate.py --gt --dt`` gives the same numbers); ``compare_runs.py`` bootstraps val images from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pycocotools.coco import COCO

from detlib.data.validation import category_labels
from detlib.evaluation.coco_eval import (
    STAT_NAMES,
    ap_per_iou,
    evaluate_coco,
    per_class_ap,
    true_positive_ious,
)
from detlib.evaluation.tide import tide_errors
from detlib.jsonio import write_json

TP_IOU_BINS = np.linspace(0.5, 1.0, 21)  # 0.025 wide, from the match threshold up


def category_names(coco: COCO) -> dict[int, str]:
    """Category id -> name of a ground truth, in id order; where ids share a name, ``"name (id N)"``
    (``category_labels``), so per-class AP keeps every class in logs, TensorBoard and ``eval_detail.json``."""
    return category_labels(list(coco.cats.values()))


def metrics(stats: dict[str, float | None]) -> dict[str, float | None]:
    """``metrics.json``'s content: the 12 COCO stats in ``STAT_NAMES`` order."""
    return {k: stats[k] for k in STAT_NAMES}


def no_detection_metrics(gt: COCO, max_dets: list[int] | tuple[int, ...] = (1, 10, 100)) -> dict[str, float | None]:
    """``metrics`` of a model that detects nothing (a diverged run), as COCO scores it: 0 wherever ``gt`` has
    objects of that kind, None where it has none (no large objects: APl and ARl are null, as for any run on
    the data), so a diverged run never adds a 0 that a finished run would not have."""
    return metrics(evaluate_coco(gt, [], max_dets)[0])


def eval_detail(iteration: int | None, stats: dict, E: Any, names: dict[int, str], val_losses: dict | None = None,
                eval_settings: dict | None = None, errors: bool = True, **extra: object) -> dict:
    """``eval_detail.json``'s content. ``E``: the accumulated ``COCOeval`` (None when there were no
    detections: no AP per IoU or class); ``names``: ``category_names``; ``errors``: also TIDE and the true
    positives' IoU (tidecv takes seconds to import); ``extra``: dataset-specific metrics."""
    return {"iteration": iteration, "stats": stats, "val_losses": val_losses or {},
            "ap_per_iou": ap_per_iou(E) if E is not None else {},
            "per_class_ap": per_class_ap(E, names) if E is not None else {},
            "tide": tide_errors(E) if E is not None and errors else None,
            "tp_iou": tp_iou_summary(E) if errors else None,
            "eval_settings": eval_settings or {}, **extra}


def tp_iou_summary(E: Any) -> dict | None:
    """The true positives' IoU with their ground truth at IoU 0.5: n, mean, quartiles and a histogram
    (``TP_IOU_BINS``, counts), so runs compare without their detections."""
    ious = true_positive_ious(E) if E is not None else None
    if ious is None or not ious.size:
        return None
    q = np.quantile(ious, [0.25, 0.5, 0.75])
    return {"n": int(ious.size), "mean": float(ious.mean()), "q25": float(q[0]), "median": float(q[1]),
            "q75": float(q[2]), "hist": np.histogram(ious, bins=TP_IOU_BINS)[0].tolist()}


def write_eval_detail(path: str | Path, iteration: int | None, stats: dict, E: Any, names: dict[int, str],
                      val_losses: dict | None = None, eval_settings: dict | None = None, **extra: object) -> dict:
    """Write ``eval_detail`` atomically to ``path``; returns what was written."""
    detail = eval_detail(iteration, stats, E, names, val_losses, eval_settings, **extra)
    write_json(path, detail)
    return detail
