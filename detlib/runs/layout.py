"""The files of a run folder, named once: everything that reads or writes one asks this module.

    RUN/
      run.json            the run's record, written once when it starts (``detlib.runs.record``)
      .lock               held by the process training in RUN (``detlib.runs.lock``)
      checkpoints/        model_{iteration}.pt, and last.pt naming the newest (``detlib.engine.checkpoint``)
      tb/                 TensorBoard event files; tb/hparams/: the run's row of the HParams table
      metrics.jsonl       one JSON line per log step and per evaluation
      metrics.csv         the same scalars, one row each (with ``+writer=csv``)
      metrics.json        the final COCO stats: the run is finished
      eval_detail.json    AP per IoU and per class, TIDE, the inference settings used
      detections.json     the detections that evaluation scored (COCO results format)
      diverged.json       why a run with ``trainer.on_nonfinite=record`` stopped (then metrics.json: AP 0)
      eval/               what ``tools/evaluate.py --run`` writes afterwards (the same file names)
      .hydra/, train.log  Hydra's: rewritten by every launch in the folder, so never read as the record
"""

from __future__ import annotations

from pathlib import Path

RECORD = "run.json"
LOCK = ".lock"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"  # in CHECKPOINTS: a hard link to the newest checkpoint
TB = "tb"
HPARAMS_RUN = "hparams"  # in TB: the HParams table's row, a TensorBoard run of its own (dashboard.log_hparams)
METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
METRICS = "metrics.json"
EVAL_DETAIL = "eval_detail.json"
DETECTIONS = "detections.json"
DIVERGED = "diverged.json"
EVAL_DIR = "eval"
HYDRA_DIR = ".hydra"


def checkpoints(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def last_checkpoint(run_dir: str | Path) -> Path:
    """``RUN/checkpoints/last.pt``: the checkpoint a tool uses unless told another."""
    return checkpoints(run_dir) / LAST


def is_finished(run_dir: str | Path) -> bool:
    """A run is finished once it wrote ``metrics.json`` (a diverged one too: ``diverged.json`` says why)."""
    return (Path(run_dir) / METRICS).is_file()


def has_diverged(run_dir: str | Path) -> bool:
    return (Path(run_dir) / DIVERGED).is_file()


def foreign_files(run_dir: str | Path) -> list[str]:
    """Checkpoints, TensorBoard event files, metrics and record already in ``run_dir`` (a run's results)."""
    run_dir = Path(run_dir)
    found = list(checkpoints(run_dir).glob("*.pt")) if checkpoints(run_dir).is_dir() else []
    found += list((run_dir / TB).glob("events.out.tfevents.*")) if (run_dir / TB).is_dir() else []
    found += [run_dir / n for n in (METRICS, RECORD) if (run_dir / n).is_file()]
    return sorted(str(p.relative_to(run_dir)) for p in found)


# The training scalars' names, in TensorBoard and in metrics.jsonl alike. TensorBoard's views sort the tags and
# group them by the part before the first "/", groups in that order: ``loss/`` (``loss/total`` and each term,
# ``loss/box_reg`` …), then ``lr``, then the ``train/`` diagnostics, then ``val/``. Runs of an older detlib
# logged the losses and lr under ``train/`` (``train/loss``, ``train/loss_box_reg``, ``train/lr``).
LR_TAG = "lr"


def loss_tag(name: str) -> str:
    """The name a training loss is logged under: ``loss`` (their sum) -> ``loss/total``, ``loss_box_reg`` ->
    ``loss/box_reg``."""
    return "loss/total" if name == "loss" else f"loss/{name.removeprefix('loss_')}"


def current_tag(key: str) -> str:
    """The name ``key`` has now, for a key an older detlib logged (``train/loss`` -> ``loss/total``,
    ``train/loss_cls`` -> ``loss/cls``, ``train/lr`` -> ``lr``); any other key is returned as it is."""
    if key == "train/lr":
        return LR_TAG
    if key == "train/loss" or key.startswith("train/loss_"):
        return loss_tag(key.removeprefix("train/"))
    return key
