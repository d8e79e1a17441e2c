"""The files an evaluation leaves, written the same way by the trainer and ``tools/evaluate.py``.

* ``metrics.json``: the 12 COCO stats, keys ``STAT_NAMES`` in order (``metrics``).
* ``eval_detail.json``: ``{iteration, stats, val_losses, ap_per_iou, per_class_ap, eval_settings, **extra}``
  (``eval_detail``); ``compare_runs.py`` reads its ``ap_per_iou`` and ``stats``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pycocotools.coco import COCO

from detlib.evaluation.coco_eval import STAT_NAMES, ap_per_iou, per_class_ap
from detlib.jsonio import write_json

METRICS = "metrics.json"
EVAL_DETAIL = "eval_detail.json"


def category_names(coco: COCO) -> dict[int, str]:
    """Category id -> name of a ground truth, in id order."""
    return {c: coco.cats[c]["name"] for c in sorted(coco.getCatIds())}


def metrics(stats: dict[str, float | None]) -> dict[str, float | None]:
    """``metrics.json``'s content: the 12 COCO stats in ``STAT_NAMES`` order."""
    return {k: stats[k] for k in STAT_NAMES}


def eval_detail(iteration: int | None, stats: dict, E: Any, names: dict[int, str], val_losses: dict | None = None,
                eval_settings: dict | None = None, **extra: object) -> dict:
    """``eval_detail.json``'s content. ``E``: the accumulated ``COCOeval`` (None when there were no
    detections: no AP per IoU or class); ``names``: ``category_names``; ``extra``: dataset-specific metrics."""
    return {"iteration": iteration, "stats": stats, "val_losses": val_losses or {},
            "ap_per_iou": ap_per_iou(E) if E is not None else {},
            "per_class_ap": per_class_ap(E, names) if E is not None else {},
            "eval_settings": eval_settings or {}, **extra}


def write_eval_detail(path: str | Path, iteration: int | None, stats: dict, E: Any, names: dict[int, str],
                      val_losses: dict | None = None, eval_settings: dict | None = None, **extra: object) -> dict:
    """Write ``eval_detail`` atomically to ``path``; returns what was written."""
    detail = eval_detail(iteration, stats, E, names, val_losses, eval_settings, **extra)
    write_json(path, detail)
    return detail
