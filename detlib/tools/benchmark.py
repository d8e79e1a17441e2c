"""Benchmark detlib's training step against torchvision's own FasterRCNN, and the COCO evaluation backends.

    uv run tools/benchmark.py --device cpu --iters 30 --warmup 5          # small model, CPU
    uv run tools/benchmark.py --device cuda --model faster_rcnn_r50_fpn --image-size 800 --batch 8 \\
        --amp bf16 --channels-last                                          # vs torchvision in fp32
    uv run tools/benchmark.py --eval-processes --eval-repeats 5            # whole evaluate.py processes per backend

One process, the same batches for both, built on the device before timing (no loading, copying or
random drawing inside the timed windows); a timing run on random images builds no dataset. "ours" is ``configs/model/*.yaml`` composed with Hydra and
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
peak memory, and the wall time of ``evaluate_coco`` with every installed backend on the same detections
(and whether their 12 stats equal pycocotools'). ``--eval-processes`` times only evaluation, as whole
``evaluate.py --gt --dt`` processes on a generated file of COCO val's size (``bench_eval.eval_fixture``).
Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from detlib.config import DataConfig
from detlib.data.build import build_datasets
from detlib.data.coco import collate
from detlib.data.sampler import TrainBatchSampler
from detlib.data.synthetic import CLASSES
from detlib.device import AMP_DTYPES, resolve_device, to_device
from detlib.evaluation.backends import BACKENDS
from detlib.jsonio import write_json
from detlib.tools.bench_eval import (
    detections,
    eval_table,
    installed_backends,
    time_eval,
    time_processes,
    write_eval_fixture,
)
from detlib.tools.bench_models import RandomDetection, build_ours, build_torchvision
from detlib.tools.bench_timing import PHASES, Side, measure, ratios
from detlib.tools.cli import cli, prog_name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("benchmark.py"), description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--model", choices=("small", "faster_rcnn_r50_fpn"), default=None,
                   help="configs/model/NAME.yaml (default: small on CPU, faster_rcnn_r50_fpn on GPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off", help="autocast for ours")
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
    p.add_argument("--eval-images", type=int, default=None,
                   help="val images whose detections are evaluated (0: skip; default 300 on CPU, 0 on GPU)")
    p.add_argument("--distinct-batches", type=int, default=4,
                   help="batches built on the device before timing and cycled (no loading inside the windows)")
    p.add_argument("--compile", action="store_true", help="torch.compile our backbone (inductor)")
    p.add_argument("--eval-repeats", type=int, default=3, help="evaluate_coco runs per backend (median)")
    ev = p.add_argument_group("whole evaluation processes (instead of the training step)")
    ev.add_argument("--eval-processes", action="store_true",
                    help="time whole `evaluate.py --gt --dt --backend B` processes per installed backend, alternating, "
                         "on a generated COCO-val-size fixture (--eval-repeats rounds after one untimed round)")
    ev.add_argument("--fixture-images", type=int, default=5000, help="images in the fixture")
    ev.add_argument("--fixture-objects", type=int, default=35000, help="ground-truth boxes (1 %% crowd regions)")
    ev.add_argument("--fixture-detections", type=int, default=200000, help="detections")
    ev.add_argument("--fixture-dir", type=Path, default=None,
                    help="write the fixture's gt.json and dt.json here and keep them (default: a temporary folder)")
    ev.add_argument("--backends", nargs="+", choices=[b for b in BACKENDS if b != "auto"], default=None,
                    help="the backends timed (default: every installed one); pycocotools is always timed first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--data-root", default=DataConfig().root, help="the synthetic data's cache folder")
    p.add_argument("--num-train", type=int, default=DataConfig().synthetic.num_train, help="synthetic train images")
    p.add_argument("--num-val", type=int, default=DataConfig().synthetic.num_val, help="synthetic val images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--note", default="", help="a line about the machine (e.g. 'shared with other jobs')")
    p.add_argument("--out", default="bench.json", help="JSON report")
    return p.parse_args(argv)


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
    if o.get("syncs_per_step") is not None:
        rows.append(f"| host syncs in one step | {o['syncs_per_step']} | {t['syncs_per_step']} | |")
    rows.append(f"\nMemory: {o['memory_method']}. Batches pre-built on the device. TF32: matmul "
                f"{'on' if s['tf32']['matmul'] else 'off'}, cuDNN convolutions {'on' if s['tf32']['cudnn_conv'] else 'off'}"
                f" (torch's defaults; they apply to the fp32 side).")
    e = report.get("eval")
    if e:
        rows += ["", eval_table(e, f"COCO evaluation of the same {e['num_detections']} detections on {e['num_images']} "
                                   f"images, in this process (median of {s['eval_repeats']}):")]
    return "\n".join(rows)


def settings(args: argparse.Namespace, argv: Sequence[str] | None, model: str, device: torch.device, size: int,
             data: str) -> dict:
    """The report's ``settings``: what was measured, where, with which versions."""
    return {
        "model": model, "device": str(device), "image_size": size, "batch": args.batch, "amp": args.amp,
        "baseline_amp": args.amp if args.baseline_amp == "same" else "off", "channels_last": args.channels_last,
        "iters": args.iters, "warmup": args.warmup, "windows": max(1, min(args.windows, args.iters)),
        "data": data, "eval_repeats": args.eval_repeats, "note": args.note,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn_conv": torch.backends.cudnn.allow_tf32},
        "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "compile": args.compile, "distinct_batches": args.distinct_batches,
        "torch": torch.__version__, "python": sys.version.split()[0],
        "command": sys.argv[1:] if argv is None else list(argv),
    }


def prebuilt_batches(data, batch: int, n: int, seed: int, device: torch.device) -> list:
    """``n`` distinct batches of ``data`` (the trainer's sampler and collate), moved to ``device`` once."""
    sampler = TrainBatchSampler(len(data), batch, seed, 0, n)
    loader = DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    return [to_device(device, images, targets) for images, targets in loader]


def run(argv: Sequence[str] | None = None) -> dict:
    """Build both models on the same batches, time them, time the evaluation; write ``--out``, print the table,
    return the report."""
    args = parse_args(argv)
    if args.eval_processes:
        return run_eval_processes(args, argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # every batch has one size here
    model_name = args.model or ("small" if device.type == "cpu" else "faster_rcnn_r50_fpn")
    eval_images = args.eval_images if args.eval_images is not None else (300 if device.type == "cpu" else 0)
    num_classes = len(CLASSES) + 1
    ours = build_ours(model_name, num_classes, args.image_size)
    size = int(ours.transform.min_size[0])
    kind = args.data if args.data != "auto" else ("random" if size > 256 else "synthetic")
    val_set = None
    if kind == "synthetic" or eval_images > 0:  # a pure timing run on random images builds no dataset
        dcfg = DataConfig(root=args.data_root)
        dcfg.synthetic.num_train, dcfg.synthetic.num_val = args.num_train, args.num_val
        train_set, val_set = build_datasets(dcfg)
    data = train_set if kind == "synthetic" else RandomDetection(size, num_classes=num_classes)
    assert val_set is None or train_set.num_classes == num_classes, "the built-in data's classes changed"
    tv = build_torchvision(ours, num_classes)
    if args.channels_last:
        ours.backbone.to(memory_format=torch.channels_last)
    if args.compile:
        ours.backbone = torch.compile(ours.backbone)
    total = args.warmup + args.iters + 10
    batches = prebuilt_batches(data, args.batch, args.distinct_batches, args.seed, device)  # the same for both
    sides = [Side("ours", ours, batches, device, args.amp, total),
             Side("torchvision", tv, batches, device, args.amp if args.baseline_amp == "same" else "off", total)]
    res = measure(sides, args, device)
    report = {"settings": settings(args, argv, model_name, device, size, kind), **res, "ratio": ratios(res)}
    if eval_images > 0:
        results, gt = detections(ours, val_set, min(eval_images, len(val_set)), device, 8)
        report["eval"] = time_eval(results, gt, args.eval_repeats)
    write_json(args.out, report)
    print(table(report))
    return report


def run_eval_processes(args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """``--eval-processes``: write the fixture, time whole evaluation processes per backend; write ``--out``, print."""
    names = ["pycocotools"] + [b for b in (args.backends or installed_backends()) if b != "pycocotools"]
    size = {"n_images": args.fixture_images, "n_objects": args.fixture_objects,
            "n_detections": args.fixture_detections, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="detlib-evalbench-") as tmp:
        gt, dt = write_eval_fixture(args.fixture_dir or Path(tmp), **size)
        e = time_processes(gt, dt, names, args.eval_repeats, Path(tmp))
    report = {"settings": {"fixture": size, "eval_repeats": args.eval_repeats, "note": args.note,
                           "python": sys.version.split()[0], "cpu": platform.processor() or platform.machine(),
                           "command": sys.argv[1:] if argv is None else list(argv)}, "eval_processes": e}
    write_json(args.out, report)
    print(eval_table(e, f"Whole `evaluate.py --gt --dt` processes on {size['n_images']} images, {size['n_objects']} "
                        f"objects, {size['n_detections']} detections (median of {e['repeats']} alternating rounds; "
                        f"ratio: median of the run-by-run ratios). {args.note}".strip()))
    return report


def _run_quiet(argv: Sequence[str] | None) -> int:
    run(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(_run_quiet, argv, "benchmark.py")
