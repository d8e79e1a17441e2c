"""``uv run tools/gpu_preflight.py --out preflight.json`` (``detlib-gpu-preflight``): before the GPU minutes are spent on measuring,
a few training steps of R50-FPN at 800 px, batch 8, in bf16, fp16 and fp32 (the trainer's own step), each
with its step time, peak memory and the host syncs of one step. Any crash shows here, in seconds.

``--device cpu --model small --image-size 64 --batch 2`` is the CPU rehearsal ``tools/gpu_check.sh --dry-run``
runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf

from detlib.compose import compose_train
from detlib.device import autocast_dtype, resolve_device
from detlib.engine.build import build_model
from detlib.engine.guards import NonFiniteGuard
from detlib.engine.state import TrainState
from detlib.engine.trainer import StepContext, step
from detlib.tools.bench_models import RandomDetection
from detlib.tools.bench_timing import Side, sync_count
from detlib.tools.benchmark import prebuilt_batches


def one(model_name: str, amp: str, size: int, batch: int, steps: int, device: torch.device) -> dict:
    """``steps`` trainer steps in ``amp``; their median time, the peak memory and the syncs of one step."""
    cfg = compose_train([f"model={model_name}", f"model.min_size={size}", f"model.max_size={size}"])
    torch.manual_seed(0)
    model = build_model(cfg, 5).to(device)
    model.backbone.to(memory_format=torch.channels_last)
    typed = OmegaConf.to_object(compose_train([]))
    tcfg = dataclasses.replace(typed.trainer, amp=amp, max_iters=steps + 2)
    state = TrainState.create(model, tcfg, device, typed.optimizer)
    guard = NonFiniteGuard("stop", 1, Path("."), None, deferred=device.type == "cuda")
    how = StepContext(model, autocast_dtype(amp), tcfg.clip_grad_norm, guard)
    batches = prebuilt_batches(RandomDetection(size, num_classes=5), batch, 2, 0, device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step(state, how, *batches[i % 2])
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    guard.raise_if_bad(steps)
    side = Side("ours", model, batches, device, amp, steps + 2)
    return {"amp": amp, "step_s": statistics.median(times[1:] or times), "first_step_s": times[0],
            "images_per_s": batch / statistics.median(times[1:] or times),
            "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "syncs_per_step": sync_count(side)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model", default="faster_rcnn_r50_fpn")
    p.add_argument("--image-size", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default="preflight.json")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    torch.backends.cudnn.benchmark = True
    import platform

    import torchvision

    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
                    "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
                    "model": args.model, "image_size": args.image_size, "batch": args.batch, "runs": []}
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}), flush=True)
    failed = False
    for amp in ("bf16", "fp16", "off"):
        try:
            r = one(args.model, amp, args.image_size, args.batch, args.steps, device)
        except Exception as e:  # noqa: BLE001 - report every precision, then fail
            failed = True
            r = {"amp": amp, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        report["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "traceback"}), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
