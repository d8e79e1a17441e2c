"""Atomic checkpoints: a crash or SIGKILL mid-write never corrupts the last good one.

``save`` writes ``model_0001000.pt`` through a temp file in the same folder (write, flush, fsync,
``os.replace``, fsync the folder), and only then moves ``last.pt`` to it: ``last.pt`` is a hard
link made under a temp name and renamed over the old one, so it always names a complete file.
Rotation keeps the newest ``keep_last`` numbered files and never the one ``last.pt`` names.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_NAME = re.compile(r"model_(\d{7})\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: object, path: Path) -> None:
    """``torch.save`` that leaves either the old file or the complete new one, never a partial one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def save(state: dict, folder: str | Path, iteration: int, keep_last: int = 3) -> Path:
    """Write ``model_{iteration}.pt`` atomically, point ``last.pt`` at it, rotate old ones."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model_{iteration:07d}.pt"
    atomic_torch_save(state, path)
    tmp_link = folder / f".last.pt.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    try:
        os.link(path, tmp_link)
    except OSError:  # no hard links on this filesystem: copy (still renamed atomically)
        shutil.copyfile(path, tmp_link)
    os.replace(tmp_link, folder / "last.pt")
    _fsync_dir(folder)
    numbered = sorted(p for p in folder.iterdir() if _NAME.match(p.name))
    for old in numbered[:-keep_last]:
        if old != path:
            old.unlink(missing_ok=True)
    return path


def load(path: str | Path) -> dict:
    """Read a checkpoint; a truncated or corrupt file is an error naming it, never a silent fresh start."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        raise CheckpointError(f"checkpoint {path} is not a detlib checkpoint (keys: {list(state)[:8]})")
    return state


def rng_state() -> dict:
    """Every RNG the run draws from: python, numpy, torch CPU and CUDA."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
