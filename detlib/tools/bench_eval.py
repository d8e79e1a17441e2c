"""``benchmark.py``'s evaluation timing: our model's detections on val images, ``evaluate_coco`` in this process
with every installed backend (``detlib.evaluation.backends``), median wall time and whether the 12 stats are identical.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from detlib.data.coco import coco_from_dict
from detlib.evaluation import backends
from detlib.evaluation.coco_eval import STAT_NAMES, evaluate_coco, to_coco_results
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


def installed_backends() -> list[str]:
    """pycocotools (the reference, first) and every other backend installed here."""
    return [b for b in backends.BACKENDS if b != "auto" and backends.installed(b)]


def same_stats(a: dict, b: dict) -> tuple[bool, float]:
    """Are two sets of the 12 stats identical (the same Nones, values within 1e-12)? And their largest difference."""
    diff = max((abs(a[k] - b[k]) for k in STAT_NAMES if a[k] is not None and b[k] is not None), default=0.0)
    return all((a[k] is None) == (b[k] is None) for k in STAT_NAMES) and diff <= 1e-12, diff


def time_eval(results: list[dict], gt: dict, repeats: int) -> dict:
    """Median wall time of ``evaluate_coco`` per installed backend on the same detections; are the stats identical?"""
    names = installed_backends()
    times: dict[str, list[float]] = {b: [] for b in names}
    stats: dict[str, dict] = {}
    for _ in range(max(repeats, 1)):
        for backend in names:
            coco = coco_from_dict(copy.deepcopy(gt))
            t = time.perf_counter()
            stats[backend], _ = evaluate_coco(coco, results, backend=backend)
            times[backend].append(time.perf_counter() - t)
    ref = statistics.median(times["pycocotools"])
    out = {}
    for b in names:
        same, diff = same_stats(stats["pycocotools"], stats[b])
        out[b] = {"version": backends.version(b), "s": statistics.median(times[b]),
                  "ratio": statistics.median(times[b]) / ref, "identical": same, "max_abs_diff": diff}
    return {"num_images": len(gt["images"]), "num_detections": len(results), "default": backends.resolve("auto"),
            "backends": out, "stats": stats["pycocotools"]}


def eval_table(e: dict, what: str) -> str:
    """One backend a row: version, wall time, ratio to pycocotools, 12 stats identical; the default marked."""
    rows = [what, "", "| backend | version | wall time, s | vs pycocotools | 12 stats identical |",
            "|---|---|---:|---:|---|"]
    for b, r in e["backends"].items():
        name = f"{b} (auto)" if b == e["default"] else b
        same = "" if b == "pycocotools" else f"{'yes' if r['identical'] else 'NO'} (max diff {r['max_abs_diff']:.1e})"
        rows.append(f"| {name} | {r['version']} | {r['s']:.3f} | {r['ratio']:.3f} | {same} |")
    return "\n".join(rows)
