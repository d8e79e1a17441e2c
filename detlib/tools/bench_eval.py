"""``benchmark.py``'s evaluation timing, two ways.

* ``time_eval``: our model's detections on val images, ``evaluate_coco`` in this process with every installed
  backend (``detlib.evaluation.backends``), median wall time and whether the 12 stats are identical.
* ``time_processes`` (``benchmark.py --eval-processes``): whole ``evaluate.py --gt --dt`` processes (start-up,
  loading, checks, evaluation) per backend on ``eval_fixture``, a generated file of COCO val's size; runs
  alternate between the backends and the ratio to pycocotools is taken run by run, so a machine's load drifting
  during the benchmark moves both sides of each ratio alike.
"""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from detlib.data.coco import coco_from_dict
from detlib.evaluation import backends
from detlib.evaluation.coco_eval import STAT_NAMES, evaluate_coco, to_coco_results
from detlib.modeling.detector import FasterRCNN

# COCO's 80 category ids (1..90 with gaps), so per-class tables have COCO's shape.
COCO_CATEGORY_IDS = tuple(i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83))


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


def eval_fixture(n_images: int = 5000, n_objects: int = 35000, n_detections: int = 200000,
                 seed: int = 0) -> tuple[dict, list[dict]]:
    """A ground-truth file and a results file about COCO val2017's size (5,000 images, 36k objects), deterministic
    in ``seed``: COCO's 80 category ids, objects 4 to 400 px (small, medium and large), 1 % of them crowd regions,
    images without objects; detections: 0-3 jittered copies of each object (misses, duplicates, 5 % of the wrong
    class), then clutter on every image up to ``n_detections`` (more than 100 on about 5 % of the images), 30 % of
    the scores rounded to two decimals (ties), listed in a shuffled order."""
    rng = np.random.default_rng(seed)
    cats = np.asarray(COCO_CATEGORY_IDS)
    W, H = rng.choice([640, 500, 480], n_images), rng.choice([480, 427, 375, 640], n_images)
    weight = rng.gamma(2.0, 1.0, n_images) * (rng.random(n_images) >= 0.01)

    def boxes(img: np.ndarray, lo: float, hi: float) -> np.ndarray:  # xywh inside image ``img``
        side, aspect = np.exp(rng.uniform(np.log(lo), np.log(hi), img.size)), np.exp(rng.normal(0, 0.5, img.size))
        w, h = np.minimum(side * np.sqrt(aspect), W[img] - 1.0), np.minimum(side / np.sqrt(aspect), H[img] - 1.0)
        return np.stack([rng.uniform(0, W[img] - w), rng.uniform(0, H[img] - h), w, h], 1)

    img = np.sort(rng.choice(n_images, n_objects, p=weight / weight.sum()))
    gt_box, gt_cat, crowd = boxes(img, 4, 400), rng.choice(cats, n_objects), rng.random(n_objects) < 0.01
    gt_box[crowd, 2:] = np.minimum(3 * gt_box[crowd, 2:], np.stack([W[img[crowd]], H[img[crowd]]], 1) - gt_box[crowd, :2])
    gt_box = np.round(gt_box, 2)
    src = np.repeat(np.arange(n_objects), rng.choice(4, n_objects, p=[0.15, 0.6, 0.2, 0.05]))
    sigma = rng.uniform(0.02, 0.3, src.size)
    tp = gt_box[src] + rng.normal(0, 1, (src.size, 4)) * sigma[:, None] * np.tile(gt_box[src, 2:], 2)
    n_fp = max(n_detections - src.size, 0)
    clutter = rng.exponential(1.0, n_images)
    fp_img = rng.choice(n_images, n_fp, p=clutter / clutter.sum())
    box = np.concatenate([tp, boxes(fp_img, 4, 300)])
    box[:, 2:] = np.maximum(box[:, 2:], 1.0)
    score = np.concatenate([np.clip(1 - 2 * sigma + rng.normal(0, 0.15, src.size), 0.01, 1), rng.beta(1.2, 4.0, n_fp)])
    score = np.maximum(np.where(rng.random(score.size) < 0.3, np.round(score, 2), np.round(score, 5)), 0.001)
    det_img = np.concatenate([img[src], fp_img]) + 1
    det_cat = np.concatenate([np.where(rng.random(src.size) < 0.05, rng.choice(cats, src.size), gt_cat[src]),
                              rng.choice(cats, n_fp)])
    box = np.round(box, 2)
    results = [{"image_id": int(det_img[k]), "category_id": int(det_cat[k]), "bbox": box[k].tolist(),
                "score": float(score[k])} for k in rng.permutation(score.size)[:n_detections]]
    gt = {"info": {"description": f"detlib evaluation fixture (seed {seed})"},
          "images": [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": int(W[i]), "height": int(H[i])}
                     for i in range(n_images)],
          "annotations": [{"id": i + 1, "image_id": int(img[i]) + 1, "category_id": int(gt_cat[i]),
                           "bbox": gt_box[i].tolist(), "area": round(float(gt_box[i, 2] * gt_box[i, 3]), 2),
                           "iscrowd": int(crowd[i])} for i in range(n_objects)],
          "categories": [{"id": int(c), "name": f"class {c}", "supercategory": "thing"} for c in cats]}
    return gt, results


def write_eval_fixture(folder: Path, **kw: int) -> tuple[Path, Path]:
    """``eval_fixture(**kw)`` as ``folder/gt.json`` and ``folder/dt.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    gt, results = eval_fixture(**kw)
    paths = folder / "gt.json", folder / "dt.json"
    for path, data in zip(paths, (gt, results)):
        path.write_text(json.dumps(data))
    return paths


def evaluate_command(gt: Path, dt: Path, backend: str, out: Path) -> list[str]:
    """The whole process timed: ``evaluate.py --gt --dt --backend --out`` in a fresh interpreter."""
    return [sys.executable, "-c", "import sys; from detlib.tools.evaluate import main; sys.exit(main())",
            "--gt", str(gt), "--dt", str(dt), "--backend", backend, "--out", str(out)]


def time_processes(gt: Path, dt: Path, names: list[str], repeats: int, work: Path) -> dict:
    """Whole-process wall time of ``evaluate_command`` per backend in ``names`` (pycocotools first), the runs
    alternating (one round: every backend once) after one untimed round; median time, median of the run-by-run
    ratios to pycocotools' run of the same round, and whether every run wrote pycocotools' 12 stats."""
    times: dict[str, list[float]] = {b: [] for b in names}
    stats: dict[str, dict] = {}
    for r in range(max(repeats, 1) + 1):
        for b in names:
            out = work / f"metrics_{b}.json"
            t = time.perf_counter()
            proc = subprocess.run(evaluate_command(gt, dt, b, out), capture_output=True, text=True)
            elapsed = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"evaluate.py --backend {b} failed: {proc.stderr.strip()[-2000:]}")
            if r:  # round 0 warms the file cache and the imports
                times[b].append(elapsed)
            stats.setdefault(b, json.loads(out.read_text()))
    ref = times["pycocotools"]
    out = {}
    for b in names:
        same, diff = same_stats(stats["pycocotools"], stats[b])
        out[b] = {"version": backends.version(b), "s": statistics.median(times[b]), "runs_s": times[b],
                  "ratio": statistics.median([x / y for x, y in zip(times[b], ref)]), "identical": same,
                  "max_abs_diff": diff}
    return {"default": backends.resolve("auto"), "repeats": max(repeats, 1), "backends": out, "stats": stats["pycocotools"]}


def eval_table(e: dict, what: str) -> str:
    """One backend a row: version, wall time, ratio to pycocotools, 12 stats identical; the default marked."""
    rows = [what, "", "| backend | version | wall time, s | vs pycocotools | 12 stats identical |",
            "|---|---|---:|---:|---|"]
    for b, r in e["backends"].items():
        name = f"{b} (auto)" if b == e["default"] else b
        same = "" if b == "pycocotools" else f"{'yes' if r['identical'] else 'NO'} (max diff {r['max_abs_diff']:.1e})"
        rows.append(f"| {name} | {r['version']} | {r['s']:.3f} | {r['ratio']:.3f} | {same} |")
    return "\n".join(rows)
