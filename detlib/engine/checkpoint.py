"""Atomic checkpoints: a crash or SIGKILL mid-write never corrupts the last good one.

``save`` writes ``model_0001000.pt`` through a temp file in the same folder (write, flush, fsync,
``os.replace``, fsync the folder), and only then moves ``last.pt`` to it: ``last.pt`` is a hard
link made under a temp name and renamed over the old one, so it always names a complete file.
Rotation keeps the newest ``keep_last`` numbered files and never the one ``last.pt`` names; given the
set of files the current run wrote (``owned``), it deletes only those, never another run's.

``discover`` finds the checkpoint to continue: ``last.pt``, or, when it was deleted or is a dangling
symlink, the newest numbered file that loads (named in the log); never a silent fresh start beside them.

``load`` reads with ``torch.load(weights_only=True)``: a checkpoint holds only tensors, numbers,
strings, ``None`` and lists/tuples/dicts of them (RNG states included, see ``rng_state``), so loading
one never runs code. A file that holds any other object is refused with an error naming it.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from detlib.errors import CheckpointError  # noqa: F401 - raised here; importable without torch from detlib.errors
from detlib.runs import LAST

log = logging.getLogger(__name__)

_NAME = re.compile(r"model_(\d{7})\.pt$")




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
        with open(tmp, "wb") as raw:
            f = _Recording(raw)
            try:
                torch.save(obj, f)
            except RuntimeError as e:  # torch reports a failed write as an inline_container enforce failure
                if f.error is None:
                    raise
                raise f.error from e
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permission: the OS's reason and the path, one line
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{e.strerror or e}: writing checkpoint {path} (the previous checkpoint is kept; "
                               f"free space in {path.parent} or set trainer.keep_last lower)") from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _Recording:
    """A binary file whose first ``OSError`` on write is kept: torch turns it into an unhelpful
    ``inline_container`` error; ``atomic_torch_save`` raises the OS's own one instead."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise

    def __getattr__(self, name: str):
        return getattr(self.f, name)


def save(state: dict, folder: str | Path, iteration: int, keep_last: int = 3, owned: set[Path] | None = None) -> Path:
    """Write ``model_{iteration}.pt`` atomically, point ``last.pt`` at it, rotate old ones.

    ``owned``: the numbered files the current run wrote (the new one is added); rotation deletes only
    those. None: every numbered file in ``folder`` is the caller's.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model_{iteration:07d}.pt"
    atomic_torch_save(state, path)
    tmp_link = folder / f".{LAST}.tmp-{os.getpid()}"
    tmp_link.unlink(missing_ok=True)
    try:
        os.link(path, tmp_link)
    except OSError:  # no hard links on this filesystem: copy (still renamed atomically)
        shutil.copyfile(path, tmp_link)
    os.replace(tmp_link, folder / LAST)
    _fsync_dir(folder)
    if owned is not None:
        owned.add(path)
    mine = numbered(folder) if owned is None else sorted(p for p in owned if p.exists())
    for old in mine[:-keep_last]:
        if old != path:
            old.unlink(missing_ok=True)
            if owned is not None:
                owned.discard(old)
    return path


def numbered(folder: str | Path) -> list[Path]:
    """The numbered checkpoints ``model_NNNNNNN.pt`` in ``folder``, oldest first."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name)) if folder.is_dir() else []


def iteration_of(path: Path) -> int:
    """The iteration in a numbered checkpoint's name."""
    m = _NAME.match(path.name)
    if m is None:
        raise ValueError(f"not a numbered checkpoint name: {path}")
    return int(m.group(1))


def discover(folder: str | Path) -> tuple[Path, dict] | None:
    """The checkpoint a run in ``folder`` continues from, loaded: ``last.pt`` when it names a file, else (deleted,
    or a dangling symlink) the newest numbered one that loads, logged with the reason; a damaged numbered file is
    named and passed over. None when ``folder`` holds no checkpoint at all; numbered files of which none loads:
    ``CheckpointError`` naming them (a fresh start would overwrite and rotate them away)."""
    folder = Path(folder)
    last = folder / LAST
    if last.is_file():
        return last, load(last)
    candidates = numbered(folder)
    if not candidates:
        return None
    why = f"{last} is a dangling symlink (to {os.readlink(last)})" if last.is_symlink() else f"{last} is missing"
    errors = []
    for path in reversed(candidates):
        try:
            state = load(path)
        except CheckpointError as e:
            log.warning("passing over %s", e)
            errors.append(str(e))
            continue
        log.warning("%s: resuming from the newest intact numbered checkpoint, %s (iteration %d)", why, path,
                    state["iteration"])
        return path, state
    raise CheckpointError(f"{why} and no numbered checkpoint in {folder} loads:\n  " + "\n  ".join(errors)
                          + "\nmove them away to start fresh, or resume one with trainer.resume=PATH")


def run_files(folder: str | Path, identity: dict, up_to: int) -> set[Path]:
    """The numbered checkpoints in ``folder`` up to iteration ``up_to`` that belong to the run ``identity``
    (read memory-mapped: only the record is unpickled): the ones a resumed run may rotate away."""
    owned = set()
    for path in numbered(folder):
        if iteration_of(path) > up_to:
            continue
        try:
            meta = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("meta", {})
        except Exception:  # noqa: BLE001 - damaged or not ours: then not the run's to delete
            continue
        if isinstance(meta, dict) and meta.get("identity") == identity:
            owned.add(path)
    return owned


# What torch's weights-only unpickler says when it refuses an object (the global it would have imported).
_REFUSED = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"(Trying to call reduce for unrecognized function \S+)"),
    re.compile(r"(Can only (?:build|create new object)[^\n]*)"),
)


def _refused(message: str) -> str | None:
    """The object torch's weights-only unpickler refused, or None when the file is simply damaged."""
    for pattern in _REFUSED:
        m = pattern.search(message)
        if m:
            return m.group(1)
    return None


def load(path: str | Path) -> dict:
    """Read a checkpoint as plain data (``weights_only=True``); nothing in the file is executed.

    A truncated or corrupt file, or one that holds objects other than tensors, numbers, strings and
    containers (a crafted file, or one written by a detlib older than its plain-data RNG states), is a
    ``CheckpointError`` naming it, never a silent fresh start.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = _refused(str(e))
        if refused is None:
            why = re.search(r"Unsupported operand \S+|[^\n]*(?:EOF|truncated|invalid)[^\n]*", str(e))
            raise CheckpointError(f"checkpoint {path} is truncated or corrupt (unreadable data: "
                                  f"{why.group(0).strip() if why else type(e).__name__})") from None
        msg = (f"checkpoint {path} contains objects that are not plain data (refused: {refused}); detlib loads "
               "checkpoints as tensors, numbers, strings and containers only and does not execute code from them")
        if refused.startswith("numpy"):
            msg += (". It was probably written by an older detlib, which stored numpy's RNG state as a numpy "
                    "object; this version cannot load such a checkpoint: start a new run directory to train again")
        raise CheckpointError(msg) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or "model" not in state or "iteration" not in state:
        keys = list(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {path} is not a detlib checkpoint (keys: {keys})")
    return state


def rng_state() -> dict:
    """Every RNG the run draws from (python, numpy, torch CPU and CUDA), as plain data.

    Tensors, numbers, strings and lists only, so a checkpoint holding it loads with
    ``weights_only=True``: python's Mersenne Twister words and numpy's key as int64 tensors.
    """
    version, words, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "numpy": {"bit_generator": str(name), "key": torch.from_numpy(np.asarray(key, np.int64).copy()),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
        # The current device's generator only: a checkpoint from an 8-GPU machine resumes on one GPU
        # (each DDP rank stores its own device's, in rng_per_rank).
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned (bit for bit)."""
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(w) for w in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state((npy["bit_generator"], np.asarray(npy["key"].tolist(), np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if isinstance(cuda, (list, tuple)):  # written by an older detlib: every visible device's; take ours
        cuda = cuda[torch.cuda.current_device()] if cuda and torch.cuda.is_available() \
            and torch.cuda.current_device() < len(cuda) else (cuda[0] if cuda else None)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
