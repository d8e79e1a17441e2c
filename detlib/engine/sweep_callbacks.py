"""Hydra callbacks for sweeps: ``CompareRuns`` runs ``tools/compare_runs.py`` on the sweep folder when
a multirun ends, so ``experiment=loss_study`` ends with its comparison table and figures."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)

COMPARE = Path(__file__).resolve().parents[2] / "tools" / "compare_runs.py"


class CompareRuns(Callback):
    """``hydra.callbacks.compare: {_target_: detlib.engine.sweep_callbacks.CompareRuns, args: [...]}``."""

    def __init__(self, args: list[str] | None = None) -> None:
        self.args = [str(a) for a in args or []]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        cmd = [sys.executable, str(COMPARE), str(sweep_dir), *self.args]
        log.info("comparing the sweep: %s", " ".join(cmd))
        proc = subprocess.run(cmd, text=True, capture_output=True)
        print(proc.stdout, end="")
        if proc.returncode != 0:  # the runs are safe on disk; say how to redo the comparison
            log.error("compare_runs failed (exit %d): %s\nre-run: %s", proc.returncode, proc.stderr[-2000:],
                      " ".join(cmd))
