"""Which metrics a dataset is scored by: COCO box AP always (``inference.evaluate``), plus the
dataset's own where it has one (``dataset.extra_metrics``; Pascal VOC: VOC07 11-point AP50).

Each extra metric is ``name -> (eval_detail.json key, TensorBoard tag, fn(results, coco_gt) -> dict
with "mAP")``; the trainer and the tools iterate over ``extra_metrics(dataset)`` and know no dataset.
"""

from __future__ import annotations

from collections.abc import Callable

from detlib.evaluation.voc_eval import voc07_ap50

EXTRA: dict[str, tuple[str, str, Callable]] = {
    "voc07": ("voc07_ap50", "val/VOC07_AP50", voc07_ap50),
}


def extra_metrics(dataset: object) -> list[tuple[str, str, Callable]]:
    return [EXTRA[name] for name in getattr(dataset, "extra_metrics", ())]
