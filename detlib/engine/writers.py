"""Where the loop's scalars go: the run's writers, chosen in config (``configs/writer/NAME.yaml``; several at
once: ``writer=[tensorboard,jsonl]`` is the default, ``writer=[jsonl]`` leaves TensorBoard out).

A writer is a plain object with two methods, built by ``open_writers`` as ``factory(run_dir, start)`` (its
yaml is a ``_partial_`` ``_target_``; ``start``: the iteration the run starts or resumes at, so the steps a
killed run wrote after its last checkpoint are dropped, not written twice):

    write(step, scalars, it_per_s=None)   # scalars: {tag: float, or None where there is no value}
    close()

The trainer writes each log step's scalars (``loss/*``, ``lr``, ``train/*``; ``it_per_s``: the training speed) and each
evaluation's (``val/*``) through ``Writers.write``. What only TensorBoard shows (figures, images, histograms,
PR curves, the HParams row) goes to ``Writers.tensorboard``, the ``SummaryWriter`` of the TensorBoard writer
when one is chosen.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from hydra.utils import instantiate
from torch.utils.tensorboard import SummaryWriter

from detlib.jsonio import append_jsonl, truncate_jsonl
from detlib.runs import METRICS_CSV, METRICS_JSONL, TB

Scalars = Mapping[str, "float | None"]


class TensorBoardWriter:
    """``RUN/tb/``: each scalar under its tag (None as NaN). ``summary``: the ``SummaryWriter`` itself."""

    def __init__(self, run_dir: str | Path, start: int = 0) -> None:
        self.summary = SummaryWriter(str(Path(run_dir) / TB), purge_step=start + 1 if start else None)

    def write(self, step: int, scalars: Scalars, it_per_s: float | None = None) -> None:
        for k, v in scalars.items():
            self.summary.add_scalar(k, float("nan") if v is None else v, step)

    def close(self) -> None:
        self.summary.close()


class JsonlWriter:
    """``RUN/metrics.jsonl``: one JSON line per write, ``{iteration, time, it_per_s (log steps), **scalars}``
    (None as null); ``tools/plot_logs.py`` reads it."""

    def __init__(self, run_dir: str | Path, start: int = 0) -> None:
        self.path = Path(run_dir) / METRICS_JSONL
        truncate_jsonl(self.path, start)

    def write(self, step: int, scalars: Scalars, it_per_s: float | None = None) -> None:
        rate = {} if it_per_s is None else {"it_per_s": it_per_s}
        append_jsonl(self.path, {"iteration": step, "time": time.time()} | rate | dict(scalars))

    def close(self) -> None:
        pass


class CsvWriter:
    """``RUN/metrics.csv``: one row per scalar, ``iteration,time,tag,value`` (long format, as log steps and
    evaluations write different tags; an empty value: None), for a spreadsheet or
    ``pandas.read_csv(path).pivot_table(index="iteration", columns="tag", values="value")``."""

    HEADER = ("iteration", "time", "tag", "value")

    def __init__(self, run_dir: str | Path, start: int = 0) -> None:
        self.path = Path(run_dir) / METRICS_CSV
        kept = []
        if self.path.is_file():  # a resumed run writes the steps after its checkpoint again
            with self.path.open(newline="") as f:
                kept = [row for row in csv.reader(f) if len(row) == 4 and row[0].isdigit() and int(row[0]) <= start]
        with self.path.open("w", newline="") as f:
            csv.writer(f).writerows([self.HEADER, *kept])

    def write(self, step: int, scalars: Scalars, it_per_s: float | None = None) -> None:
        now = time.time()
        rows = [(step, now, k, "" if v is None else v) for k, v in scalars.items()]
        rows += [] if it_per_s is None else [(step, now, "it_per_s", it_per_s)]
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerows(rows)

    def close(self) -> None:
        pass


class Writers:
    """The run's writers (rank 0's; the other ranks have none): ``write`` and ``close`` go to each."""

    def __init__(self, writers: Iterable = ()) -> None:
        self.writers = list(writers)

    def write(self, step: int, scalars: Scalars, it_per_s: float | None = None) -> None:
        for w in self.writers:
            w.write(step, scalars, it_per_s=it_per_s)

    def close(self) -> None:
        for w in self.writers:
            w.close()

    @property
    def tensorboard(self) -> SummaryWriter | None:
        """The TensorBoard writer's ``SummaryWriter``, for what only TensorBoard shows; None without one."""
        return next((w.summary for w in self.writers if isinstance(w, TensorBoardWriter)), None)


def open_writers(specs: Mapping[str, Mapping] | None, run_dir: str | Path, start: int = 0) -> Writers:
    """The writers ``specs`` names (the config's ``writer`` node: name -> a ``_partial_`` ``_target_``), opened
    in ``run_dir`` at iteration ``start``, in the config's order."""
    return Writers(instantiate(spec)(Path(run_dir), start) for spec in (specs or {}).values())
