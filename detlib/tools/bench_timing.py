"""``benchmark.py``'s timing: one ``Side`` per model (its optimizer, data and training step) and the timed
windows, alternated so that load drifting on a shared machine hits both alike."""

from __future__ import annotations

import argparse
import gc
import math
import resource
import statistics
import time

import torch
from torch.utils.data import DataLoader

from detlib.config import TrainerConfig
from detlib.engine.device import autocast, autocast_dtype, to_device
from detlib.engine.trainer import lr_lambda, optimizer_step

PHASES = ("data", "forward", "backward", "optimizer")


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
        self.dtype = autocast_dtype(amp)
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
        images, targets = to_device(self.device, *next(self.batches))
        t1 = self._now()
        with autocast(self.device, self.dtype):
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


def _window(side: Side, n: int, r: dict, device: torch.device, can_reset: bool) -> None:
    """``n`` timed steps of ``side``; adds the step time, phases and peak memory to ``r``."""
    cuda = device.type == "cuda"
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
    r["peak_mib"] = max(r["peak_mib"], torch.cuda.max_memory_allocated(device) / 2**20 if cuda else _peak_rss_mib())


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
            _window(side, n, res[side.name], device, can_reset)
    if cuda:  # the split needs a sync between phases; the windows above had none
        for side in sides:
            side.sync_phases = True
            res[side.name]["phases"] = [side.step() for _ in range(max(3, min(args.iters, 10)))]
            side.sync_phases = False
    gc.unfreeze()
    return {name: _summary(r, args.batch, cuda, can_reset) for name, r in res.items()}


def _summary(r: dict, batch: int, cuda: bool, can_reset: bool) -> dict:
    if cuda:
        method = "torch.cuda.max_memory_allocated (tensors only)"
    elif can_reset:
        method = "peak RSS (VmHWM, reset through /proc/self/clear_refs before each window) of the whole process"
    else:
        method = "ru_maxrss of the whole process, never reset: an upper bound, the same for both"
    step = statistics.median(r["window_s"])
    return {
        "images_per_s": batch / step,  # the median window's
        "step_s": step,
        "window_step_s": r["window_s"],
        "phases_s": {k: statistics.median(p[k] for p in r["phases"]) for k in PHASES},  # per step, median
        "peak_memory_mib": r["peak_mib"],
        "rss_before_mib": None if cuda or not can_reset else r["rss_before_mib"],
        "memory_method": method,
    }


def ratios(res: dict[str, dict]) -> dict[str, float]:
    """ours / torchvision: the median of the window-by-window step-time ratios (robust to load drift),
    and the ratios of the medians."""
    o, t = res["ours"], res["torchvision"]
    return {"step_time": statistics.median(a / b for a, b in zip(o["window_step_s"], t["window_step_s"])),
            "step_time_of_medians": o["step_s"] / t["step_s"],
            "images_per_s": o["images_per_s"] / t["images_per_s"]}
