"""What stops training, and how it says so: non-finite losses and SIGINT/SIGTERM.

* ``NonFiniteGuard``: a NaN or inf loss stops the run (``on_nonfinite=stop``) with an error naming the
  iteration, every loss term and the batch's images, and dumps the batch; or skips the step, up to
  ``max_nonfinite`` in a row. Under DDP the flag is OR-ed over ranks so every rank takes the same branch.
* ``SignalGuard``: the first SIGINT/SIGTERM asks for a checkpoint and a stop at the next step boundary
  (``Interrupted`` is raised by the loop); a second one raises ``Interrupted(aborted=True)`` at once.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import torch
from torch import Tensor

from detlib import distributed as dist

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN or inf; the message names the iteration, the loss terms and the images."""


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt: no ``except Exception`` swallows it
    """SIGINT/SIGTERM stopped training. ``aborted``: a second signal, raised at once (no new checkpoint);
    else a checkpoint at ``iteration`` was saved first."""

    def __init__(self, signum: int, iteration: int = -1, aborted: bool = False) -> None:
        self.signum, self.iteration, self.aborted = signum, iteration, aborted
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"{self.signal_name} at iteration {iteration}" + (" (aborted)" if aborted else ""))


class SignalGuard:
    """Installs SIGINT/SIGTERM handlers for a ``with`` block. ``saved_at``: the newest checkpoint's
    iteration, named when a second signal aborts."""

    def __init__(self, saved_at: int = 0) -> None:
        self.signum: int | None = None
        self.saved_at = saved_at
        self._old: dict = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is not None:  # the second one: abort now, even mid-evaluation
            raise Interrupted(signum, self.saved_at, aborted=True)
        self.signum = signum
        log.warning("%s: saving a checkpoint and stopping at the next step boundary (after an evaluation in "
                    "progress); send it again to abort at once", signal.Signals(signum).name)

    def __enter__(self) -> SignalGuard:
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


class NonFiniteGuard:
    """``check`` every step; with ``deferred`` (one process on CUDA, ``on_nonfinite`` stop or record) the
    check stays on the device, so no step waits for the GPU before its backward, and ``raise_if_bad`` reads
    it at the loop's boundaries (log, evaluation, checkpoint, end), naming the first bad iteration; the
    batch is no longer at hand to dump then. ``skip`` and DDP need the answer at once: every step."""

    def __init__(self, on_nonfinite: str, max_in_row: int, run_dir: Path, dataset, deferred: bool = False) -> None:
        self.on_nonfinite, self.max_in_row, self.run_dir, self.dataset = on_nonfinite, max_in_row, run_dir, dataset
        self.in_row = 0
        self.deferred = deferred and on_nonfinite != "skip" and dist.world_size() == 1
        self.first_bad: Tensor | None = None  # deferred: the first non-finite iteration (1-based), -1 if none

    def check(self, loss: Tensor, stop_asked: bool, device: torch.device, iteration: int = 0
              ) -> tuple[bool, bool, bool]:
        """``(bad here, bad on any rank, stop asked on any rank)``: one scalar read, one all-reduce under DDP;
        deferred: no read (``iteration``, 0-based, is the step's own)."""
        if self.deferred:
            if self.first_bad is None:
                self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
            bad = ~torch.isfinite(loss.detach())
            self.first_bad = torch.where(bad & (self.first_bad < 0), iteration + 1, self.first_bad)
            return False, False, stop_asked
        bad_here = not torch.isfinite(loss)
        if dist.world_size() == 1:
            return bad_here, bad_here, stop_asked
        flags = dist.any_true(torch.tensor([bad_here, stop_asked], device=device))
        return bad_here, bool(flags[0]), bool(flags[1])

    def raise_if_bad(self, done: int) -> None:
        """Deferred: raise ``NonFiniteLossError`` if a step up to ``done`` had a non-finite loss (one read)."""
        if self.first_bad is None:
            return
        first = int(self.first_bad)
        if first >= 0:
            raise NonFiniteLossError(
                f"non-finite loss at iteration {first} (found at iteration {done}: on CUDA the check is read at "
                "each log, evaluation and checkpoint step; trainer.on_nonfinite=skip checks every step and "
                "dumps the batch)")

    def handle(self, it: int, bad_here: bool, out: dict, targets: list) -> None:
        """A non-finite step: raise, or log and let the caller skip it."""
        self.in_row += 1
        detail = (describe_nonfinite(it, out, targets, self.dataset, self.run_dir) if bad_here else
                  f"non-finite loss on another rank at iteration {it + 1} (this is rank {dist.rank()})")
        if self.on_nonfinite in ("stop", "record") or self.in_row >= self.max_in_row:
            raise NonFiniteLossError(detail)
        log.warning("skipping step: %s", detail)


def describe_nonfinite(it: int, out: dict, targets: list, dataset, run_dir: Path) -> str:
    """Name the iteration, every loss term and the batch's images; dump the batch and the model's
    ``dump/*`` diagnostics (proposals, labels, deltas) for inspection."""
    values = {k: float(v.detach()) for k, v in out["losses"].items()}
    ids = [t["image_id"] for t in targets]
    files = [dataset.coco.imgs[i]["file_name"] for i in ids]
    suffix = f"_rank{dist.rank()}" if dist.world_size() > 1 else ""
    dump = run_dir / f"nonfinite_iter{it + 1:07d}{suffix}.pt"
    extra = {k.split("/", 1)[1]: v.cpu() for k, v in (out.get("diagnostics") or {}).items() if k.startswith("dump/")}
    torch.save({"iteration": it + 1, "losses": values, "image_ids": ids, "files": files,
                "targets": [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets],
                **extra}, dump)
    return (f"non-finite loss at iteration {it + 1}: " + ", ".join(f"{k}={v}" for k, v in values.items())
            + f"; image ids {ids}; files {files}; batch dumped to {dump}")
