"""``benchmark.py``'s timing: one ``Side`` per model (its optimizer, data and training step) and the timed
windows, alternated so that load drifting on a shared machine hits both alike."""

from __future__ import annotations

import argparse
import gc
import itertools
import math
import resource
import statistics
import time
import warnings
from pathlib import Path

import torch
from omegaconf import OmegaConf

from detlib.compose import compose_train
from detlib.device import autocast, autocast_dtype
from detlib.engine.guards import NonFiniteGuard
from detlib.engine.state import TrainState
from detlib.engine.trainer import StepContext, step

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
    """One model with its optimizer, the batches and the step torchvision's reference or our trainer takes.

    ``batches``: already on the device, shared by both sides and cycled, so no window pays for loading,
    host-to-device copies or drawing random images. Ours is ``detlib.engine.trainer.step`` itself (its
    ``TrainState``, non-finite guard and metrics window); torchvision's is its detection reference's
    ``train_one_epoch`` step (``loss.item()`` finite check before backward, ``.item()`` of every term after).
    """

    def __init__(self, name: str, model: torch.nn.Module, batches: list, device: torch.device,
                 amp: str, total_steps: int) -> None:
        self.name, self.model, self.device = name, model.to(device).train(), device
        self.batches = itertools.cycle(batches)
        typed = OmegaConf.to_object(compose_train([f"trainer.max_iters={max(total_steps, 1)}", f"trainer.amp={amp}"]))
        self.cfg = typed.trainer
        self.dtype = autocast_dtype(amp)
        self.state = TrainState.create(model, self.cfg, device, typed.optimizer)  # the default: SGD, warm-up
        self.guard = NonFiniteGuard("stop", 1, Path("."), None, deferred=device.type == "cuda")
        self.how = StepContext(self.model, self.dtype, self.cfg.clip_grad_norm, self.guard)
        self.logged: dict[str, float] = {}
        self._mark: dict[str, float] = {}
        # One call does forward, backward and step: hooks mark where forward and backward end.
        self.model.register_forward_hook(lambda *_: self._mark_end("forward"))
        self.state.optimizer.register_step_pre_hook(lambda *_: self._mark_end("backward"))
        self.sync_phases = False

    def _mark_end(self, phase: str) -> None:  # a hook: returns None, so the output is left alone
        self._mark.setdefault(phase, self._now())

    def _now(self) -> float:
        if self.sync_phases and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def step(self) -> dict[str, float]:
        """One training step; returns the seconds per phase (exact on CPU, or when ``sync_phases``)."""
        t0 = self._now()
        images, targets = next(self.batches)
        t1 = self._now()
        self._mark.clear()
        if self.name == "ours":  # detlib.engine.trainer.train's step
            step(self.state, self.how, images, targets)
        else:  # torchvision/references/detection/engine.py train_one_epoch
            opt, scaler = self.state.optimizer, self.state.scaler
            with autocast(self.device, self.dtype):
                out = self.model(images, targets)
            loss = sum(out.values())
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"torchvision: non-finite loss {loss}")
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            self.state.scheduler.step()
            self.logged = {k: v.item() for k, v in {"loss": loss, **out}.items()}  # its MetricLogger.update
        t4 = self._now()
        t2 = self._mark.get("forward", t1)
        t3 = self._mark.get("backward", t4)
        return {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}

    def finish(self) -> None:
        """Raise if ours had a non-finite loss (on CUDA the guard is read here, as the trainer reads it at
        its log steps)."""
        self.guard.raise_if_bad(self.state.iteration)


def sync_count(side: Side) -> int | None:
    """Host-device synchronisations in one step of ``side`` (``torch.cuda.set_sync_debug_mode``); None on CPU."""
    if side.device.type != "cuda":
        return None
    torch.cuda.synchronize(side.device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            side.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


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
    for side in sides:
        res[side.name]["syncs_per_step"] = sync_count(side)
        side.finish()
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
        "syncs_per_step": r.get("syncs_per_step"),
    }


def ratios(res: dict[str, dict]) -> dict[str, float]:
    """ours / torchvision: the median of the window-by-window step-time ratios (robust to load drift),
    and the ratios of the medians."""
    o, t = res["ours"], res["torchvision"]
    return {"step_time": statistics.median(a / b for a, b in zip(o["window_step_s"], t["window_step_s"])),
            "step_time_of_medians": o["step_s"] / t["step_s"],
            "images_per_s": o["images_per_s"] / t["images_per_s"]}
