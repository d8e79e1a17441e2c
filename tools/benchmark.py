"""Benchmark detlib's training step against torchvision's own FasterRCNN, and the two COCO backends.

    uv run tools/benchmark.py --device cpu --iters 30 --warmup 5          # small model, CPU
    uv run tools/benchmark.py --device cuda --model faster_rcnn_r50_fpn --image-size 800 --batch 8 \\
        --amp bf16 --channels-last                                          # vs torchvision in fp32

One process, the same data for both. "ours" is ``configs/model/*.yaml`` composed with Hydra and
trained through ``detlib.engine.trainer.optimizer_step``, as ``train.py`` does. "torchvision" is
``torchvision.models.detection.FasterRCNN`` built from copies of our backbone, anchor generator,
RPN head, RoIAlign and box head (same types, same weights), with the same sizes, proposal counts
and sampling, and its default RoIHeads loss (smooth L1, beta = 1/9, as our default loss); it is
trained the way torchvision's detection reference does (SGD with momentum, ``loss.item()`` finite
check and per-term ``.item()`` logging every step). Timed windows of the two alternate, so a busy
machine slows both alike: compare the ratios, not the absolute numbers.

Reports images/s (median over windows), the ours / torchvision step-time ratio (median of the
ratios of neighbouring windows), the step split into data / forward / backward / optimizer
(on GPU from extra steps with ``torch.cuda.synchronize`` between phases; the windows have none),
peak memory, and the wall time of ``evaluate_coco`` with pycocotools and faster-coco-eval on the
same detections (and whether their 12 stats agree). Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

from detlib.config import DataConfig, TrainerConfig, register
from detlib.data.build import build_datasets
from detlib.data.coco import coco_from_dict, collate
from detlib.data.sampler import TrainBatchSampler
from detlib.engine.trainer import _to, lr_lambda, optimizer_step
from detlib.evaluation.coco_eval import STAT_NAMES, backend_classes, evaluate_coco, to_coco_results
from detlib.modeling.detector import FasterRCNN

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
SIDES = ("ours", "torchvision")
PHASES = ("data", "forward", "backward", "optimizer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=("small", "faster_rcnn_r50_fpn"), default=None,
                   help="configs/model/NAME.yaml (default: small on CPU, faster_rcnn_r50_fpn on GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="autocast for ours")
    p.add_argument("--baseline-amp", choices=("off", "same"), default="off",
                   help="torchvision's precision: off (fp32, the reference default) or the same as --amp")
    p.add_argument("--channels-last", action="store_true", help="channels_last backbone for ours")
    p.add_argument("--batch", type=int, default=8, help="images per step")
    p.add_argument("--iters", type=int, default=30, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per model first")
    p.add_argument("--windows", type=int, default=10, help="timed windows per model (images/s is their median)")
    p.add_argument("--image-size", type=int, default=None, help="min_size = max_size of the transform (default: the model's)")
    p.add_argument("--data", choices=("auto", "synthetic", "random"), default="auto",
                   help="built-in synthetic images, or random ones (auto: random above 256 px)")
    p.add_argument("--eval-images", type=int, default=300, help="val images whose detections are evaluated (0: skip)")
    p.add_argument("--eval-repeats", type=int, default=3, help="evaluate_coco runs per backend (median)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--data-root", default=DataConfig().root, help="the synthetic data's cache folder")
    p.add_argument("--num-train", type=int, default=DataConfig().synthetic.num_train, help="synthetic train images")
    p.add_argument("--num-val", type=int, default=DataConfig().synthetic.num_val, help="synthetic val images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line about the machine (e.g. 'shared with other jobs')")
    p.add_argument("--out", default="bench.json", help="JSON report")
    return p.parse_args(argv)


class RandomDetection(Dataset):
    """Noise images ``(3, size, size)`` with 1-6 random boxes of ``num_classes - 1`` labels, fixed per index."""

    def __init__(self, size: int, length: int = 512, num_classes: int = 5) -> None:
        self.size, self.length, self.num_classes = size, length, num_classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index = item[0] if isinstance(item, tuple) else item
        g = torch.Generator().manual_seed(index)
        n = int(torch.randint(1, 7, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * self.size * 0.7
        wh = (torch.rand(n, 2, generator=g) * 0.25 + 0.05) * self.size
        boxes = torch.cat([xy, (xy + wh).clamp(max=self.size)], 1)
        labels = torch.randint(1, self.num_classes, (n,), generator=g)
        return torch.rand(3, self.size, self.size, generator=g), {"boxes": boxes, "labels": labels, "image_id": index}


def build_ours(model: str, num_classes: int, image_size: int | None) -> FasterRCNN:
    """Our detector from ``configs/train.yaml`` with ``model=NAME`` (Hydra compose, as train.py)."""
    overrides = [f"model={model}"]
    if image_size:
        overrides += [f"model.min_size={image_size}", f"model.max_size={image_size}"]
    register()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    return instantiate(cfg.model, num_classes=num_classes, box_loss=instantiate(cfg.loss),
                       rpn_box_loss=instantiate(cfg.rpn_loss))


def build_torchvision(ours: FasterRCNN, num_classes: int) -> TVFasterRCNN:
    """torchvision's ``FasterRCNN`` from copies of our parts (same types and weights), same settings."""
    rpn, head = ours.rpn, ours.roi_head
    box_head = TwoMLPHead(head.mlp.fc6.in_features, head.mlp.fc6.out_features)
    box_head.load_state_dict(head.mlp.state_dict())
    predictor = FastRCNNPredictor(head.cls_score.in_features, num_classes)
    predictor.load_state_dict({**{f"cls_score.{k}": v for k, v in head.cls_score.state_dict().items()},
                               **{f"bbox_pred.{k}": v for k, v in head.bbox_pred.state_dict().items()}})
    t = ours.transform
    return TVFasterRCNN(
        copy.deepcopy(ours.backbone), num_classes=None, min_size=t.min_size, max_size=t.max_size,
        image_mean=t.image_mean, image_std=t.image_std,
        rpn_anchor_generator=copy.deepcopy(rpn.anchor_generator), rpn_head=copy.deepcopy(rpn.head),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"], rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"], rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold, rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction,
        box_roi_pool=copy.deepcopy(head.roi_align), box_head=box_head, box_predictor=predictor,
        box_score_thresh=head.score_thresh, box_nms_thresh=head.nms_thresh,
        box_detections_per_img=head.detections_per_img, box_fg_iou_thresh=head.matcher.high_threshold,
        box_bg_iou_thresh=head.matcher.low_threshold, box_batch_size_per_image=head.sampler.batch_size_per_image,
        box_positive_fraction=head.sampler.positive_fraction, bbox_reg_weights=head.box_coder.weights)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _reset_peak_rss() -> bool:
    """Reset Linux's peak-RSS mark (VmHWM, ru_maxrss) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class Side:
    """One model with its optimizer, loader and the step torchvision's reference or our trainer takes."""

    def __init__(self, name: str, model: torch.nn.Module, loader: DataLoader, device: torch.device,
                 amp: str, total_steps: int) -> None:
        self.name, self.model, self.device = name, model.to(device).train(), device
        self.batches = iter(loader)
        tc = TrainerConfig(max_iters=max(total_steps, 1))
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(tc))  # warm-up, as both do
        self.dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.accum: dict[str, torch.Tensor] = {}
        self.logged: dict[str, float] = {}
        self._mark: list[float] = []
        # optimizer_step does zero_grad + backward + step in one call: this marks where backward ends.
        self.optimizer.register_step_pre_hook(lambda *_: self._mark.append(self._now()))
        self.sync_phases = False

    def _now(self) -> float:
        if self.sync_phases and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> dict[str, float]:
        """One training step; returns the seconds per phase (exact on CPU, or when ``sync_phases``)."""
        t0 = self._now()
        images, targets = _to(self.device, *next(self.batches))
        t1 = self._now()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            out = self.model(images, targets)
        self._mark.clear()
        if self.name == "ours":  # detlib.engine.trainer.train's step
            losses = out["losses"]
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                raise FloatingPointError(f"ours: non-finite loss {loss}")
            t2 = self._now()
            optimizer_step(loss, self.optimizer, self.scaler, self.params, None)
            self.scheduler.step()
            for k, v in losses.items():
                self.accum[k] = self.accum.get(k, 0) + v.detach().float()
        else:  # torchvision/references/detection/engine.py train_one_epoch
            loss = sum(out.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"torchvision: non-finite loss {loss}")
            t2 = self._now()
            self.optimizer.zero_grad()
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.scheduler.step()
            self.logged = {k: v.item() for k, v in {"loss": loss, **out}.items()}  # its MetricLogger.update
        t4 = self._now()
        t3 = self._mark[0] if self._mark else t4
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}


def measure(sides: list[Side], args: argparse.Namespace, device: torch.device) -> dict[str, dict]:
    """Warm-up, then timed windows in ABBA order (ours, tv, tv, ours, ...): load that drifts on a shared
    machine hits both alike, and each ours window is compared with its neighbouring tv window."""
    cuda = device.type == "cuda"
    for side in sides:
        for _ in range(args.warmup):
            side.step()
    # Everything built so far (torch, Hydra, the data, both models) is long-lived: frozen out of the
    # collector, a full collection no longer walks it, and those pauses stop landing at random in
    # either model's windows.
    gc.collect()
    gc.freeze()
    windows = max(1, min(args.windows, args.iters))
    sizes = [args.iters // windows + (i < args.iters % windows) for i in range(windows)]
    res = {s.name: {"window_s": [], "phases": [], "peak_mib": 0.0, "rss_before_mib": math.inf} for s in sides}
    can_reset = _reset_peak_rss() if not cuda else False
    for i, n in enumerate(sizes):
        for side in (sides if i % 2 == 0 else sides[::-1]):
            r = res[side.name]
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            elif can_reset:
                _reset_peak_rss()
                r["rss_before_mib"] = min(r["rss_before_mib"], _rss_mib())
            t = time.perf_counter()
            phases = [side.step() for _ in range(n)]
            if cuda:
                torch.cuda.synchronize(device)
            r["window_s"].append((time.perf_counter() - t) / n)
            if not cuda:  # CPU work is synchronous: the phases of the timed steps are exact
                r["phases"] += phases
            r["peak_mib"] = max(r["peak_mib"], torch.cuda.max_memory_allocated(device) / 2**20 if cuda
                                else _peak_rss_mib())
    if cuda:  # the split needs a sync between phases; the windows above had none
        for side in sides:
            side.sync_phases = True
            res[side.name]["phases"] = [side.step() for _ in range(max(3, min(args.iters, 10)))]
            side.sync_phases = False
    gc.unfreeze()
    if cuda:
        method = "torch.cuda.max_memory_allocated (tensors only)"
    elif can_reset:
        method = "peak RSS (VmHWM, reset through /proc/self/clear_refs before each window) of the whole process"
    else:
        method = "ru_maxrss of the whole process, never reset: an upper bound, the same for both"
    out = {}
    for name, r in res.items():
        step = statistics.median(r["window_s"])
        out[name] = {
            "images_per_s": args.batch / step,  # the median window's
            "step_s": step,
            "window_step_s": r["window_s"],
            "phases_s": {k: statistics.median(p[k] for p in r["phases"]) for k in PHASES},  # per step, median
            "peak_memory_mib": r["peak_mib"],
            "rss_before_mib": None if cuda or not can_reset else r["rss_before_mib"],
            "memory_method": method,
        }
    return out


def ratios(res: dict[str, dict]) -> dict[str, float]:
    """ours / torchvision: the median of the window-by-window step-time ratios (robust to load drift),
    and the ratios of the medians."""
    o, t = res["ours"], res["torchvision"]
    return {"step_time": statistics.median(a / b for a, b in zip(o["window_step_s"], t["window_step_s"])),
            "step_time_of_medians": o["step_s"] / t["step_s"],
            "images_per_s": o["images_per_s"] / t["images_per_s"]}


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


def table(report: dict) -> str:
    """The report as markdown."""
    o, t, r = report["ours"], report["torchvision"], report["ratio"]
    s = report["settings"]
    ms = lambda x: f"{1000 * x:.1f}"  # noqa: E731
    rows = [
        f"**{s['model']}**, {s['image_size']} px, batch {s['batch']}, {s['device_name']}, "
        f"ours {s['amp']}{' + channels_last' if s['channels_last'] else ''} vs torchvision {s['baseline_amp']}; "
        f"{s['iters']} timed steps in {s['windows']} windows after {s['warmup']} warm-up. {s['note']}".strip(),
        "",
        "| | ours (detlib) | torchvision | ours / torchvision |",
        "|---|---:|---:|---:|",
        f"| images/s (median of windows) | {o['images_per_s']:.2f} | {t['images_per_s']:.2f} | {r['images_per_s']:.3f} |",
        f"| step time, ms (median window) | {ms(o['step_s'])} | {ms(t['step_s'])} | {r['step_time_of_medians']:.3f} |",
        f"| step time, window-by-window ratio (median) | | | **{r['step_time']:.3f}** |",
    ]
    for k in PHASES:
        a, b = o["phases_s"][k], t["phases_s"][k]
        rows.append(f"| &nbsp; {k}, ms (median step) | {ms(a)} | {ms(b)} | {a / b if b else float('nan'):.3f} |")
    rows.append(f"| peak memory, MiB | {o['peak_memory_mib']:.0f} | {t['peak_memory_mib']:.0f} | "
                f"{o['peak_memory_mib'] / max(t['peak_memory_mib'], 1e-9):.3f} |")
    rows.append(f"\nMemory: {o['memory_method']}.")
    e = report.get("eval")
    if e:
        rows += ["", f"COCO evaluation of the same {e['num_detections']} detections on {e['num_images']} images "
                 f"(median of {s['eval_repeats']}):", "",
                 "| backend | wall time, s | vs pycocotools | 12 stats identical |", "|---|---:|---:|---|",
                 f"| pycocotools | {e['pycocotools_s']:.3f} | 1.000 | |",
                 f"| faster_coco_eval | {e['faster_coco_eval_s']:.3f} | {e['ratio']:.3f} | "
                 f"{'yes' if e['identical'] else 'NO'} (max diff {e['max_abs_diff']:.1e}) |"
                 if e["ratio"] is not None else "| faster_coco_eval | not installed | | |"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model_name = args.model or ("small" if device.type == "cpu" else "faster_rcnn_r50_fpn")
    dcfg = DataConfig(root=args.data_root)
    dcfg.synthetic.num_train, dcfg.synthetic.num_val = args.num_train, args.num_val
    train_set, val_set = build_datasets(dcfg)
    ours = build_ours(model_name, train_set.num_classes, args.image_size)
    size = int(ours.transform.min_size[0])
    kind = args.data if args.data != "auto" else ("random" if size > 256 else "synthetic")
    data = train_set if kind == "synthetic" else RandomDetection(size, num_classes=train_set.num_classes)
    tv = build_torchvision(ours, train_set.num_classes)
    if args.channels_last:
        ours.backbone.to(memory_format=torch.channels_last)
    total = args.warmup + args.iters + 10

    def loader() -> DataLoader:  # the same batches, in the same order, for both
        return DataLoader(data, batch_sampler=TrainBatchSampler(len(data), args.batch, args.seed, 0, total),
                          collate_fn=collate, pin_memory=device.type == "cuda")

    sides = [Side("ours", ours, loader(), device, args.amp, total),
             Side("torchvision", tv, loader(), device, args.amp if args.baseline_amp == "same" else "off", total)]
    res = measure(sides, args, device)
    report = {
        "settings": {
            "model": model_name, "device": str(device), "image_size": size, "batch": args.batch, "amp": args.amp,
            "baseline_amp": args.amp if args.baseline_amp == "same" else "off", "channels_last": args.channels_last,
            "iters": args.iters, "warmup": args.warmup, "windows": max(1, min(args.windows, args.iters)),
            "data": kind, "eval_repeats": args.eval_repeats, "note": args.note,
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
            "torch": torch.__version__, "python": sys.version.split()[0], "command": sys.argv[1:] if argv is None else argv,
        },
        **res,
        "ratio": ratios(res),
    }
    if args.eval_images > 0:
        results, gt = detections(ours, val_set, min(args.eval_images, len(val_set)), device, 8)
        report["eval"] = time_eval(results, gt, args.eval_repeats)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    return report


if __name__ == "__main__":
    main()
