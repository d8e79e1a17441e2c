"""torch.distributed glue for ``torchrun``: process group from the environment, rank helpers, one
shared run directory, and the few collectives the trainer needs.

Everything here is a no-op in a single process, so the trainer reads the same with and without DDP.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes in the environment (``WORLD_SIZE`` > 1).

    CUDA tensors go over NCCL and CPU tensors over gloo, so ``trainer.device=cpu`` works on a GPU
    machine too. Returns whether this process is part of a multi-process run.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(minutes=int(os.environ.get("DETLIB_DIST_TIMEOUT_MIN", "30")))
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is None:
        dist.init_process_group(backend, timeout=timeout)
        return True
    # torchrun shares one store across restarts: without a per-attempt prefix the restarted workers
    # read the dead workers' gloo addresses (connection refused) and hang or fail to connect.
    store, rank_, world = next(dist.rendezvous("env://", timeout=timeout))
    _STORE.append(store)  # outlives restarts: where rank 0 of the first attempt leaves the run directory
    dist.init_process_group(backend, store=dist.PrefixStore(f"detlib/attempt_{restart}", store), rank=rank_,
                            world_size=world, timeout=timeout)
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if dist.is_initialized() else 0


def local_world_size() -> int:
    """Processes on this machine (torchrun's ``LOCAL_WORLD_SIZE``), 1 without DDP."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if dist.is_initialized() else 1


_STAMP: list[str] = []
_STORE: list = []  # torchrun's agent store (one per torchrun invocation, kept across restarts)


def run_stamp(base: str = "outputs", choose: Callable[[], str] | None = None) -> str:
    """A run directory under ``base``, the same on every rank (Hydra resolver ``detlib_run_dir``).

    ``choose`` picks it (default ``claim_new_folder``: a new ``base/DATE/TIME``, claimed with ``mkdir`` so two runs
    started in the same second get two folders, the second ``TIME-1``). Under torchrun, rank 0 chooses and
    leaves the name in torchrun's store, where the other ranks, and every rank after a ``--max-restarts``
    restart, read it: the restarted workers continue in the same folder, while another torchrun job gets
    its own.
    """
    if _STAMP:
        return _STAMP[0]
    choose = choose or (lambda: claim_new_folder(base))
    if world_size() == 1:
        stamp = choose()
    elif _STORE:
        key, store = f"detlib/run_dir/{base}", _STORE[0]
        if rank() == 0 and not store.check([key]):
            store.set(key, choose())
        stamp = store.get(key).decode()
    else:  # a process group made without torchrun: no restarts, rank 0's choice is broadcast
        box = [choose() if rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        stamp = box[0]
    _STAMP.append(stamp)
    return stamp


def claim_new_folder(base: str) -> str:
    parent = Path(base) / time.strftime("%Y-%m-%d")
    parent.mkdir(parents=True, exist_ok=True)
    name = time.strftime("%H-%M-%S")
    for n in range(10_000):
        path = parent / (name if n == 0 else f"{name}-{n}")
        try:
            path.mkdir()
            return str(path)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not claim a new run directory under {parent}")


def any_true(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise OR of a small bool/float vector over all ranks (one all-reduce)."""
    flags = flags.float()
    if world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags > 0


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Average each tensor over ranks (one all-reduce for the whole dict)."""
    if world_size() == 1 or not values:
        return values
    keys = list(values)  # the same order on every rank: the same code made them
    flat = torch.stack([values[k].float() for k in keys])
    dist.all_reduce(flat)
    return dict(zip(keys, flat / world_size()))


def gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (on every rank)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
