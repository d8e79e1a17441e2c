"""``benchmark.py``'s evaluation timing: our detections on val images, scored by both COCO backends."""

from __future__ import annotations

import copy
import statistics
import sys
import time

import torch

from detlib.data.coco import coco_from_dict
from detlib.evaluation.coco_eval import STAT_NAMES, backend_classes, evaluate_coco, to_coco_results
from detlib.modeling.detector import FasterRCNN


@torch.no_grad()
def detections(model: FasterRCNN, val, n: int, device: torch.device, batch: int) -> tuple[list[dict], dict]:
    """Our model's COCO results on the first ``n`` val images, and the ground truth of those images."""
    model.eval()
    ids, results = val.ids[:n], []
    for i in range(0, len(ids), batch):
        items = [val[j] for j in range(i, min(i + batch, len(ids)))]
        images = [im.to(device) for im, _ in items]
        out = model(images, detect=True)["detections"]
        results += to_coco_results(out, [t["image_id"] for _, t in items], val.label_to_cat)
    model.train()
    keep = set(ids)
    gt = val.coco.dataset
    gt = {**gt, "images": [im for im in gt["images"] if im["id"] in keep],
          "annotations": [a for a in gt["annotations"] if a["image_id"] in keep]}
    return results, gt


def time_eval(results: list[dict], gt: dict, repeats: int) -> dict:
    """Median wall time of ``evaluate_coco`` per backend on the same detections; are the stats identical?"""
    times: dict[str, list[float]] = {"pycocotools": [], "faster_coco_eval": []}
    try:
        backend_classes("faster_coco_eval")
    except ImportError as e:
        print(f"benchmark: evaluation timed with pycocotools only: {e}", file=sys.stderr)
        del times["faster_coco_eval"]
    stats: dict[str, dict] = {}
    for _ in range(max(repeats, 1)):
        for backend in times:
            coco = coco_from_dict(copy.deepcopy(gt))
            t = time.perf_counter()
            stats[backend], _ = evaluate_coco(coco, results, backend=backend)
            times[backend].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    out = {"num_images": len(gt["images"]), "num_detections": len(results), "pycocotools_s": med["pycocotools"],
           "faster_coco_eval_s": None, "ratio": None, "identical": None, "max_abs_diff": None,
           "stats": stats["pycocotools"]}
    if "faster_coco_eval" in stats:
        a, b = stats["pycocotools"], stats["faster_coco_eval"]
        diff = max((abs(a[k] - b[k]) for k in STAT_NAMES if a[k] is not None and b[k] is not None), default=0.0)
        same = all((a[k] is None) == (b[k] is None) for k in STAT_NAMES) and diff <= 1e-6
        out.update(faster_coco_eval_s=med["faster_coco_eval"], ratio=med["faster_coco_eval"] / med["pycocotools"],
                   identical=same, max_abs_diff=diff)
    return out
