"""Hydra callbacks for sweeps: ``SweepSummary`` (every multirun) says where the runs are and the command
that compares them; ``CompareRuns`` compares the runs of the sweep folder when a multirun ends
(``detlib.tools.compare_runs``, in this process), so ``experiment=loss_study`` ends with its comparison
table and figures."""

from __future__ import annotations

import logging
import shlex
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from detlib import runs
from detlib.tools import compare_runs

log = logging.getLogger(__name__)


class CompareRuns(Callback):
    """``hydra.callbacks.compare: {_target_: detlib.tools.sweep_callbacks.CompareRuns, args: [...]}``;
    ``args``: ``compare_runs.py``'s options (``--baseline loss=smooth_l1``)."""

    def __init__(self, args: list[str] | None = None) -> None:
        self.args = [str(a) for a in args or []]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        argv = [str(Path(config.hydra.sweep.dir).resolve()), *self.args]
        args = " ".join(shlex.quote(a) for a in argv)
        rerun = f"detlib-compare {args}   (in a checkout: uv run tools/compare_runs.py {args})"
        log.info("comparing the runs under %s", argv[0])
        try:
            compare_runs.run(argv)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - the runs are safe on disk; the sweep must not fail
            log.error("the comparison failed (%s: %s); the runs are kept. Re-run it with:\n  %s",
                      type(e).__name__, e, rerun)


class SweepSummary(Callback):
    """Every multirun (configs/train.yaml) ends by saying where its runs are and how to compare them."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir).resolve()
        folders = sorted(p.parent for p in sweep.glob(f"*/{runs.RECORD}"))
        done = sum(runs.is_finished(r) for r in folders)
        log.info("sweep finished: %d runs (%d with metrics) under %s\n  compare them: uv run tools/compare_runs.py %s",
                 len(folders), done, sweep, shlex.quote(str(sweep)))
