"""Find finished runs under folders and read each one's set-up, seed, metrics and AP per IoU.

A run is a folder with a ``run.json`` (or, made by older detlib, ``.hydra/config.yaml``). Its set-up is
read from ``run.json``, written once when it started, never from Hydra's ``.hydra`` files (a later
launch in the folder rewrites those), plus the inference settings its metrics were computed with
(``eval_detail.json``'s ``eval_settings``, else the record's ``eval``): runs that differ in them are not
one set-up; for older runs the ``.hydra`` files are all there is, and keys
added to ``detlib.config`` since take their defaults so old and new runs compare.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from detlib.config import Config
from detlib.engine import run_record
from detlib.evaluation.report import EVAL_DETAIL, METRICS
from detlib.tools.cli import ToolError

# Keys that say how a run was executed, not what was trained: left out of a group's identity.
IGNORED = ("seed", "trainer.progress", "trainer.device", "trainer.resume", "trainer.num_threads",
           "trainer.log_period", "trainer.checkpoint_period", "trainer.keep_last", "data.root",
           "data.num_workers", "hydra", "experiment")


@dataclass
class Run:
    path: Path
    seed: int
    identity: dict[str, object]  # flattened config minus IGNORED, with the inference settings of its metrics
    overrides: list[str]  # overrides.yaml minus IGNORED
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (hydra.runtime.choices)
    metrics: dict | None = None  # None: unfinished
    ap_per_iou: dict[str, float | None] | None = None
    tide: dict | None = None  # eval_detail.json's "tide": TIDE's dAP per error type
    tp_iou: dict | None = None  # eval_detail.json's "tp_iou": the true positives' IoU distribution
    diverged: str | None = None  # diverged.json's reason (trainer.on_nonfinite=record): scored AP 0
    problem: str = ""
    legacy: bool = False  # no run.json: set-up read from Hydra's rewritable .hydra files


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_runs(dirs: Sequence[Path]) -> list[Path]:
    """Every folder under ``dirs`` holding ``run.json`` or ``.hydra/config.yaml`` (not looking inside a run)."""
    found = []
    for d in dirs:
        if not d.is_dir():
            raise ToolError(f"not a folder: {d}")
        for root, subdirs, _ in os.walk(d):
            if (Path(root) / run_record.RECORD).is_file() or (Path(root) / ".hydra" / "config.yaml").is_file():
                found.append(Path(root))
                subdirs.clear()
            else:
                subdirs[:] = [s for s in subdirs if not s.startswith(".")]
    return sorted(set(found), key=_natural)


def ignored(key: str) -> bool:
    """Is ``key`` (``trainer.device``, or an override's ``+key``) one of the execution-only ``IGNORED`` keys?"""
    key = key.lstrip("+~")
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as JSON strings."""
    if not isinstance(node, dict):
        return {prefix: json.dumps(node) if isinstance(node, list) else node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def load_run(path: Path) -> Run:
    """Read a run's record, metrics and AP per IoU; missing results leave ``metrics`` None."""
    run = _from_record(path) if (path / run_record.RECORD).is_file() else _from_hydra_files(path)
    return run if run.problem else _with_metrics(run)


def _from_record(path: Path) -> Run:
    try:
        record = run_record.read_record(path)
    except run_record.RunIdentityError as e:
        return Run(path, -1, {}, [], problem=str(e))
    # Inference settings (score threshold, detections per image, ...) are left out of run_record's identity, as
    # they may change on resume, but they change the metrics: runs compare only at equal settings.
    settings = record["identity"] | (record.get("eval") or {})
    identity = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in settings.items() if k != "seed"}
    overrides = [o for o in record.get("overrides", []) if not ignored(o.split("=", 1)[0])]
    return Run(path, int(record["identity"].get("seed", 0)), identity, overrides,
               {k: str(v) for k, v in (record.get("choices") or {}).items()})


def _from_hydra_files(path: Path) -> Run:
    """A run made before ``run.json`` existed: its set-up as its ``.hydra`` files say (a later launch in its
    folder may have rewritten them)."""
    try:
        cfg = OmegaConf.to_container(_with_schema_defaults(OmegaConf.load(path / ".hydra" / "config.yaml")),
                                     resolve=False)
        ov_file = path / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(ov_file)] if ov_file.is_file() else []
        hydra_file = path / ".hydra" / "hydra.yaml"
        hydra = OmegaConf.to_container(OmegaConf.load(hydra_file), resolve=False) if hydra_file.is_file() else {}
    except Exception as e:  # noqa: BLE001 - yaml and OmegaConf raise many types; one bad run must not stop the rest
        return Run(path, -1, {}, [], problem=f"unreadable .hydra files ({type(e).__name__})")
    overrides = [o for o in overrides if not ignored(o.split("=", 1)[0])]
    identity = {k: v for k, v in flatten(cfg).items() if not ignored(k)}
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return Run(path, int(cfg.get("seed", 0)), identity, overrides,
               {k: str(v) for k, v in choices.items() if v is not None and not k.startswith("hydra/")},
               legacy=True)


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
    used = detail.get("eval_settings") if isinstance(detail, dict) and not run.legacy else None
    if isinstance(used, dict):  # the settings metrics.json was computed with (a resume may have changed them)
        run.identity |= {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in used.items()}
    diverged = _read_json(run.path / "diverged.json")
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
    own, later = _read_json(path / EVAL_DETAIL), _read_json(path / "eval" / EVAL_DETAIL)
    if isinstance(own, dict) and own.get(key):
        return own[key]
    if isinstance(later, dict) and later.get(key) and ap is not None:
        if abs((later.get("stats") or {}).get("AP", math.nan) - ap) < 1e-9:
            return later[key]
    return None


def _with_schema_defaults(cfg: DictConfig) -> DictConfig:
    """Keys added to ``detlib.config`` since the run was made get their defaults, so old and new runs compare."""
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException:  # a key since removed or retyped: compare the config as saved
        return cfg
