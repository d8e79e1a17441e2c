"""Which metrics a val set is scored by besides COCO box AP (always, ``inference.evaluate``): those the
evaluation settings name, ``eval.metrics``. ``configs/data/voc.yaml`` sets ``[voc07]`` (Pascal VOC's own
11-point AP50); any COCO-format data can ask for it too (``eval.metrics=[voc07]``).

A metric is a ``Metric``: a function ``fn(results, coco_gt) -> dict`` with its ``"mAP"``, the
``eval_detail.json`` key its result is written under and the scalar tag its mAP is logged as. The trainer
(``engine/evaluation.py``) and ``tools/evaluate.py`` both score ``extra_metrics(eval.metrics)`` with
``compute``, so the two write the same ``eval_detail.json``; neither knows a metric or a dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pycocotools.coco import COCO

from detlib.evaluation.voc_eval import voc07_ap50


@dataclass(frozen=True)
class Metric:
    key: str  # eval_detail.json's key for the function's whole result
    tag: str  # the scalar its "mAP" is written as (TensorBoard, metrics.jsonl)
    fn: Callable[[list[dict], COCO], dict]  # (COCO results, ground truth) -> {"mAP": float | None, ...}


METRICS: dict[str, Metric] = {
    "voc07": Metric("voc07_ap50", "val/VOC07_AP50", voc07_ap50),
}


def extra_metrics(names: Sequence[str]) -> list[Metric]:
    """The metrics ``names`` (``eval.metrics``) asks for; an unknown name is an error naming the known ones."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ValueError(f"config: eval.metrics: no metric {unknown[0]!r} (known: {', '.join(METRICS)})")
    return [METRICS[n] for n in names]


def compute(metrics: Sequence[Metric], results: list[dict], coco_gt: COCO) -> dict[str, dict]:
    """``{metric.key: its result}`` of ``results`` (all of them: rank 0's gathered ones) against ``coco_gt``."""
    return {m.key: m.fn(results, coco_gt) for m in metrics}
