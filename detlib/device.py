"""Where tensors run: the device a config names, the autocast precision, and moving a batch there.

One place for what the trainer, evaluation and the tools (``detlib.tools``) all do.
"""

from __future__ import annotations

import os
import time

import torch
from torch import nn

from detlib import distributed as dist

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fast_bf16(device: torch.device) -> str | None:
    """Why ``device`` runs bf16 fast (``"CUDA bf16"``, ``"CPU AMX"``, ``"CPU AVX512-BF16"``), or None: CUDA GPUs with
    native bf16 (Ampere on), CPUs whose oneDNN kernels have bf16 instructions; elsewhere bf16 is emulated and
    slower than float32."""
    if device.type == "cuda":
        return "CUDA bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type == "cpu":
        if torch.cpu._is_amx_tile_supported():
            return "CPU AMX"
        if torch.cpu._is_avx512_bf16_supported():
            return "CPU AVX512-BF16"
    return None


def resolve_amp(amp: str, device: torch.device) -> str:
    """``trainer.amp=auto`` -> ``bf16`` where ``fast_bf16(device)``, ``off`` (float32) elsewhere; other values as
    they are. A run records the resolved value, so runs on machines that differ here are never one group."""
    if str(amp) != "auto":
        return str(amp)
    return "bf16" if fast_bf16(device) else "off"


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present. Under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config: trainer.device={name} but CUDA is not available (use trainer.device=auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """``trainer.amp`` (``off | bf16 | fp16``; ``auto`` goes through ``resolve_amp`` first) -> the autocast dtype;
    None: full precision."""
    try:
        return AMP_DTYPES[str(amp)]
    except KeyError:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}") from None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``; disabled (full precision) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def channels_last(model: nn.Module, enabled: bool = True) -> nn.Module:
    """``model``'s backbone (FPN included) in channels_last memory format, when ``enabled``: the inputs stay NCHW
    and the first convolution switches layout. Faster on CPU too (oneDNN): measured on the 2-core AVX512-BF16
    machine, the small backbone's forward + backward took 0.94x the time of NCHW in fp32 and 0.82x in bf16."""
    if enabled and hasattr(model, "backbone"):
        model.backbone.to(memory_format=torch.channels_last)
    return model


def to_device(device: torch.device, images: list, targets: list) -> tuple[list, list]:
    """A batch (images, target dicts) on ``device``; non-tensor target fields (``image_id``) stay as they are."""
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


def busy_cores(sample_s: float = 0.3) -> float | None:
    """How many cores other processes keep busy, from two reads of ``/proc/stat``; None off Linux.

    Sampled while this process sleeps, so it measures everyone else."""
    try:
        with open("/proc/stat") as f:
            before = f.readline()
        time.sleep(sample_s)
        with open("/proc/stat") as f:
            after = f.readline()
        return busy_between(before, after)
    except (OSError, ValueError, IndexError):  # no /proc (not Linux), or a sandbox's /proc/stat in another format
        return None


def busy_between(before: str, after: str) -> float:
    """Busy cores between two ``/proc/stat`` ``cpu`` lines: (non-idle time / all time) x number of cores."""
    a = [int(x) for x in before.split()[1:]]
    b = [int(x) for x in after.split()[1:]]
    delta = [y - x for x, y in zip(a, b)]
    total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest time is inside user)
    if total <= 0:
        return 0.0
    idle = delta[3] + delta[4]
    return (total - idle) / total * (os.cpu_count() or 1)


def thread_advice(busy: float | None, threads: int, cores: int) -> str | None:
    """A warning when torch's intra-op threads outnumber the idle cores, else None.

    Measured on a 2-core machine: 2 threads ran 8.6 it/s quiet but 2.9 it/s with one core busy
    elsewhere, where 1 thread ran 5.9 (threads that share a core wait on each other at every op)."""
    if busy is None or busy < 0.5:
        return None
    idle = max(1, round(cores - busy))
    if threads <= idle:
        return None
    return (f"{busy:.1f} of {cores} CPU cores are busy with other work and torch uses {threads} threads: they "
            f"will wait on each other (about 3x slower on a 2-core machine). Set trainer.num_threads={idle} "
            "while the machine is shared")
