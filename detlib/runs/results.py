"""Find runs under folders and read each one's set-up, seed, metrics and AP per IoU, for ``compare_runs``.

A run is a folder with a ``run.json``. Its set-up is read from ``run.json``, written once when it started,
never from Hydra's ``.hydra`` files (a later launch in the folder rewrites those), plus the inference
settings its metrics were computed with (``eval_detail.json``'s ``eval_settings``, else the record's
``eval``): runs that differ in them are not one set-up (``record.comparison_identity``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from detlib.errors import ToolError
from detlib.runs import record as run_record
from detlib.runs.layout import DIVERGED, EVAL_DETAIL, EVAL_DIR, METRICS, RECORD


@dataclass
class Run:
    path: Path
    seed: int
    identity: dict[str, object]  # record.comparison_identity: what its group shares
    overrides: list[str]  # the launch's overrides that can name its group (record.tells_groups_apart)
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (hydra.runtime.choices)
    metrics: dict | None = None  # None: unfinished
    ap_per_iou: dict[str, float | None] | None = None
    tide: dict | None = None  # eval_detail.json's "tide": TIDE's dAP per error type
    tp_iou: dict | None = None  # eval_detail.json's "tp_iou": the true positives' IoU distribution
    diverged: str | None = None  # diverged.json's reason (trainer.on_nonfinite=record): scored AP 0
    problem: str = ""
    record: dict = field(default_factory=dict)  # its run.json


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_runs(dirs: Sequence[Path]) -> list[Path]:
    """Every folder under ``dirs`` holding a ``run.json`` (not looking inside a run)."""
    found = []
    for d in dirs:
        if not d.is_dir():
            raise ToolError(f"not a folder: {d}")
        for root, subdirs, _ in os.walk(d):
            if (Path(root) / RECORD).is_file():
                found.append(Path(root))
                subdirs.clear()
            else:
                subdirs[:] = [s for s in subdirs if not s.startswith(".")]
    return sorted(set(found), key=_natural)


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def load_run(path: Path) -> Run:
    """Read a run's record, metrics and AP per IoU; missing results leave ``metrics`` None."""
    run = _from_record(path)
    return run if run.problem else _with_metrics(run)


def _from_record(path: Path) -> Run:
    try:
        record = run_record.read_record(path)
    except run_record.RunIdentityError as e:
        return Run(path, -1, {}, [], problem=str(e))
    if record is None:
        return Run(path, -1, {}, [], problem=f"no {RECORD}")
    overrides = [o for o in record.get("overrides", []) if run_record.tells_groups_apart(o.split("=", 1)[0])]
    return Run(path, int(record["identity"].get(run_record.SEED, 0)), run_record.comparison_identity(record),
               overrides, {k: str(v) for k, v in (record.get("choices") or {}).items()}, record=record)


def _with_metrics(run: Run) -> Run:
    metrics_file = run.path / METRICS
    if not metrics_file.is_file():
        run.problem = f"no {METRICS} (unfinished)"
        return run
    metrics = _read_json(metrics_file)
    if not isinstance(metrics, dict) or "AP" not in metrics:
        run.problem = f"{METRICS} unreadable or without AP"
        return run
    run.metrics = metrics
    detail = _read_json(run.path / EVAL_DETAIL)
    used = detail.get("eval_settings") if isinstance(detail, dict) else None
    if isinstance(used, dict):  # the settings metrics.json was computed with (a resume may have changed them)
        run.identity = run_record.comparison_identity(run.record, used)
    diverged = _read_json(run.path / DIVERGED)
    run.diverged = str(diverged.get("reason", "?")) if isinstance(diverged, dict) else None
    run.ap_per_iou, run.tide, run.tp_iou = (_from_eval_detail(run.path, metrics["AP"], k)
                                            for k in ("ap_per_iou", "tide", "tp_iou"))
    return run


def reconcile_diverged(runs: Sequence[Run]) -> None:
    """Older detlib wrote 0.0 for every stat of a diverged run, also where COCO says null (no large objects in the
    val set: APl, ARl). A diverged run's 0.0 is read as None where every finished run on the same val data
    (``data.fingerprint.val``) reports None, so groups never average in a 0 that no real evaluation gives."""
    for r in runs:
        if not (r.diverged and r.metrics):
            continue
        val = r.identity.get("data.fingerprint.val")
        peers = [p for p in runs if p.metrics and not p.diverged and p.identity.get("data.fingerprint.val") == val]
        for k, v in r.metrics.items():
            if v == 0.0 and peers and all(p.metrics.get(k) is None for p in peers):
                r.metrics[k] = None


def _from_eval_detail(path: Path, ap: float | None, key: str) -> dict | None:
    """``key`` of the trainer's ``eval_detail.json``, else of one ``tools/evaluate.py`` wrote afterwards
    (``RUN/eval/``, for runs older than the key) if it evaluated the same thing (same AP)."""
    own, later = _read_json(path / EVAL_DETAIL), _read_json(path / EVAL_DIR / EVAL_DETAIL)
    if isinstance(own, dict) and own.get(key):
        return own[key]
    if isinstance(later, dict) and later.get(key) and ap is not None:
        if abs((later.get("stats") or {}).get("AP", math.nan) - ap) < 1e-9:
            return later[key]
    return None
