"""Train a Faster R-CNN with a pluggable box-regression loss.

    uv run train.py                                  # the default job on the built-in data
    uv run train.py loss=huber loss.delta=0.5        # pick a loss
    uv run train.py -m loss=smooth_l1,huber,l1,l2    # a sweep, one directory per job
    uv run train.py experiment=smoke                 # the whole pipeline in under a minute

Each run folder is owned by one process (``RUN/.lock``) and holds one run, recorded once in
``RUN/run.json``: a launch into a folder whose record has another set-up is refused, a finished run
is skipped, an unfinished one resumed. SIGINT/SIGTERM save a checkpoint and exit 130/143.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shlex
import sys
from pathlib import Path

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from pycocotools.coco import COCO

from detlib import distributed as dist
from detlib import runs
from detlib.config import Config, TrainerConfig, check_ranges, register
from detlib.data.build import annotation_files, build_datasets
from detlib.device import busy_cores, fast_bf16, resolve_amp, resolve_device, thread_advice
from detlib.engine.build import build_losses, build_model
from detlib.engine.checkpoint import CheckpointError
from detlib.engine.guards import Interrupted, NonFiniteLossError
from detlib.engine.optim import check_optimizer
from detlib.engine.trainer import Job, RunMeta, train
from detlib.evaluation.evaluators import extra_metrics
from detlib.evaluation.report import no_detection_metrics
from detlib.jsonio import write_json
from detlib.modeling.proposals import check_proposal_ids

register()
log = logging.getLogger("train")
# Errors whose message says everything (bad config, data, checkpoint, folder): one line, no traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, FloatingPointError, CheckpointError,
               runs.RunIdentityError, runs.RunDirInUse, InstantiationException)


def continue_command(run_dir: Path) -> str:
    """The command that continues this run (or sweep): the same overrides, pinned to its folder."""
    hc = HydraConfig.get()
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    if hc.mode == RunMode.MULTIRUN:
        args.append(f"hydra.sweep.dir={hydra_quote(str(Path(hc.sweep.dir).resolve()))}")
    else:
        args.append(f"hydra.run.dir={hydra_quote(str(run_dir.resolve()))}")
    return "uv run train.py " + " ".join(shlex.quote(a) for a in args)


# What Hydra's override lexer takes unquoted in a value (ASCII letters, digits and these); anything else
# (a non-ASCII folder name, a space, a comma) must be a quoted string, or the pasted command fails to parse.
_HYDRA_PLAIN = re.compile(r"[A-Za-z0-9_/\-+.$%*@?|]+")


def hydra_quote(value: str) -> str:
    """``value`` as one Hydra override value: as is when the lexer reads it so, else single-quoted."""
    if _HYDRA_PLAIN.fullmatch(value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _to_log_file(msg: str) -> None:
    """Write ``msg`` to train.log only (stderr gets Hydra's own report of the error)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            h.emit(logging.LogRecord("train", logging.ERROR, __file__, 0, msg, None, None))
            h.flush()


def _restore_hydra_files(run_dir: Path) -> None:
    """Hydra has rewritten ``.hydra/`` with a launch that was refused: put the recorded run's back."""
    try:
        record = runs.read_record(run_dir)
    except runs.RunIdentityError:
        return
    if record and dist.is_main():
        runs.restore_hydra_files(run_dir, record)


def _drop_log_files() -> None:
    for h in [h for h in logging.getLogger().handlers if isinstance(h, logging.FileHandler)]:
        logging.getLogger().removeHandler(h)
        h.close()


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if not dist.is_main():  # under torchrun only rank 0 writes train.log
        _drop_log_files()
    try:
        lock = runs.RunLock(run_dir).acquire() if dist.is_main() else None
    except runs.RunDirInUse:
        _drop_log_files()  # that train.log belongs to the live run
        _restore_hydra_files(run_dir)
        raise
    try:
        return run(cfg, run_dir)
    except Interrupted as e:
        if e.aborted:
            log.error("%s again: aborted at once; the last checkpoint is the one saved before", e.signal_name)
        else:
            log.warning("%s: saved a checkpoint at iteration %d; continue with:\n  %s", e.signal_name,
                        e.iteration, continue_command(run_dir))
        sys.exit(128 + e.signum)  # also stops a Hydra multirun: its next job never starts
    except BaseException as e:  # the reason a run died goes into its train.log, not only to stderr
        if isinstance(e, runs.RunIdentityError):  # a refused launch: the run in the folder stays as it was
            _restore_hydra_files(run_dir)
        elif not isinstance(e, SystemExit):
            _to_log_file(f"run failed: {type(e).__name__}: {e}")
        if isinstance(e, USER_ERRORS) and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"train.py: error: {_one_line(e)}", file=sys.stderr)  # HYDRA_FULL_ERROR=1: the traceback
            sys.exit(1)
        raise
    finally:
        if lock is not None:
            lock.release()


def _one_line(e: BaseException) -> str:
    """The error as one line; a constructor's refusal (``loss.delta=-1``) as ``KEY (TARGET): reason``."""
    if isinstance(e, InstantiationException) and e.__cause__ is not None:
        key, target = re.search(r"full_key: (\S+)", str(e)), re.search(r"target '([^']+)'", str(e))
        return f"{key.group(1) if key else 'config'} ({target.group(1) if target else '?'}): {e.__cause__}"
    return str(e)


def run(cfg: DictConfig, run_dir: Path) -> float | None:
    """Check the folder's record, build data and model, train (or skip a finished run)."""
    typed: Config = OmegaConf.to_object(cfg)  # library code gets dataclasses, not a DictConfig
    check_ranges(typed)
    resolve_precision(cfg, typed)
    typed.data.root = to_absolute_path(os.path.expanduser(typed.data.root))  # relative to where the user launched
    if typed.trainer.resume == "" and dist.is_main() and runs.foreign_files(run_dir):
        raise runs.RunIdentityError(
            f"trainer.resume= (start fresh) but {run_dir} already holds a run "
            f"({', '.join(runs.foreign_files(run_dir)[:4])}); start fresh in a new folder instead of mixing "
            "two runs in one")
    seed_everything(typed.seed)
    set_threads(typed.trainer)

    box_loss, rpn_box_loss = build_losses(cfg)  # fail fast on bad parameters, before any data is built
    check_optimizer(typed.optimizer, typed.trainer)
    extra_metrics(typed.eval.metrics)  # an unknown metric name
    saved = runs.read_record(run_dir) if runs.is_finished(run_dir) else None
    files = annotation_files(typed.data) if saved is not None else None
    if files is not None and all(f.is_file() for f in files.values()):
        # A finished run is recognised before any data is built: its annotation files hashed as they are
        # (the same bytes: the classes it recorded), the rest of its identity from the config.
        config = resolved_config(cfg, typed)
        runs.check(saved, runs.identity(
            config, world_size=dist.world_size(), num_classes=saved["identity"].get("num_classes"),
            data_fingerprints={k: runs.file_fingerprint(f) for k, f in files.items()}), run_dir)
        return skip_finished(run_dir, typed, runs.diff(saved.get("eval", {}), runs.eval_settings(config)))
    if not dist.is_main():
        dist.barrier()  # rank 0 builds the data once, then the others read it
    train_set, val_set = build_datasets(typed.data)
    if dist.is_main():
        dist.barrier()
    model = build_model(cfg, train_set.num_classes, box_loss, rpn_box_loss)
    check_proposal_ids(model, train=train_set.ids, val=val_set.ids)  # Fast R-CNN with a proposals file

    record, eval_changes = record_for(cfg, typed, train_set, val_set, run_dir)
    if runs.is_finished(run_dir):  # data without annotation files of its own (VOC): known once built
        return skip_finished(run_dir, typed, eval_changes)
    if eval_changes:
        log.warning("inference-only settings differ from the run's record (allowed: they change the "
                    "evaluation, not the training):\n  %s", "\n  ".join(eval_changes))
    if dist.world_size() > 1:  # same initial weights everywhere; then each rank its own random stream
        seed_everything(typed.seed + dist.rank())
    log.info("run directory: %s (%d process%s)", run_dir, dist.world_size(), "es" if dist.world_size() > 1 else "")
    log.info("data: %d train / %d val images, classes %s", len(train_set), len(val_set), train_set.class_names)
    log.info("box loss: %r   rpn box loss: %r", box_loss, rpn_box_loss)
    try:
        stats = train(Job(model, train_set, val_set, typed, run_dir, RunMeta.of(record), runs.hparams(record)))
    except NonFiniteLossError as e:
        if typed.trainer.on_nonfinite != "record":
            raise
        stats = record_divergence(run_dir, e, val_set.coco, list(typed.eval.max_dets))
    return stats.get("AP")


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators from ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_precision(cfg: DictConfig, typed: Config) -> None:
    """``trainer.amp=auto`` -> what this device runs fast, in both configs: the record holds the precision used."""
    if typed.trainer.amp == "auto":
        device = resolve_device(typed.trainer.device)
        typed.trainer.amp = cfg.trainer.amp = resolve_amp("auto", device)
        log.info("trainer.amp=auto: %s on %s (%s)", typed.trainer.amp, device.type,
                 fast_bf16(device) or "no fast bf16: float32")


def set_threads(trainer: TrainerConfig) -> None:
    """``trainer.num_threads``; 0 (torch's default) on one CPU process: a warning when other processes keep
    cores busy, naming the value to set."""
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    elif dist.world_size() == 1 and resolve_device(trainer.device).type == "cpu":
        advice = thread_advice(busy_cores(), torch.get_num_threads(), os.cpu_count() or 1)
        if advice:
            log.warning(advice)


def skip_finished(run_dir: Path, typed: Config, eval_changes: list[str]) -> float | None:
    """A finished run is a result: kept as it is, its AP returned (a sweep's objective)."""
    log.info("%s: this run %s; skipping it (%s kept)", run_dir, f"diverged ({runs.DIVERGED})"
             if runs.has_diverged(run_dir) else f"finished at iteration {typed.trainer.max_iters}", runs.METRICS)
    if eval_changes:
        log.warning("its metrics were computed with the recorded inference settings, not these:\n  %s\n"
                    "to evaluate it with them: uv run tools/evaluate.py --run %s --config-overrides ...",
                    "\n  ".join(eval_changes), run_dir)
    return read_metrics(run_dir).get("AP")


def resolved_config(cfg: DictConfig, typed: Config) -> dict:
    """The launch's config as plain containers, resolved, with ``data.root`` absolute as the run used it."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config["data"]["root"] = typed.data.root
    return config


def record_divergence(run_dir: Path, error: NonFiniteLossError, gt: COCO, max_dets: list[int]) -> dict:
    """``trainer.on_nonfinite=record``: a diverged run is a result (a stability sweep goes on): ``metrics.json``
    holds what COCO says of no detections on the val set ``gt`` (0 where it has such objects, null where it
    has none, as a finished run's), and ``diverged.json`` says why."""
    stats = no_detection_metrics(gt, max_dets)
    if dist.is_main():
        write_json(run_dir / runs.DIVERGED, {"reason": str(error).splitlines()[0]})
        write_json(run_dir / runs.METRICS, stats)
    log.warning("diverged (non-finite loss), recorded as AP 0: %s", str(error).splitlines()[0])
    return stats


def record_for(cfg: DictConfig, typed: Config, train_set, val_set, run_dir: Path) -> tuple[dict, list[str]]:
    """This launch's record and its inference-only differences from the folder's record; refuses the
    launch if the folder holds a run of another identity, writes the record if the folder has none."""
    config = resolved_config(cfg, typed)
    ident = runs.identity(
        config, world_size=dist.world_size(), num_classes=train_set.num_classes,
        data_fingerprints={"train": runs.fingerprint(train_set), "val": runs.fingerprint(val_set)})
    hc = HydraConfig.get()
    record = runs.make_record(
        config, ident, overrides=list(hc.overrides.task),
        choices={k: str(v) for k, v in hc.runtime.choices.items() if v is not None and not k.startswith("hydra/")},
        data_files={"train": str(train_set.ann_file), "val": str(val_set.ann_file)},
        classes=[{"id": c, "name": n} for c, n in zip(train_set.cat_ids, train_set.class_names)],
        hydra_config=runs.hydra_config_text(run_dir))  # before trainer.amp=auto was resolved
    saved = runs.read_record(run_dir)
    if saved is None:
        leftovers = [f for f in runs.foreign_files(run_dir) if f != runs.RECORD]
        if leftovers and dist.is_main():
            raise runs.RunIdentityError(
                f"{run_dir} holds results ({', '.join(leftovers[:4])}) but no {runs.RECORD}: they cannot be "
                "attributed to a set-up (made by an older detlib, or copied in); use a new folder")
        if dist.is_main():
            runs.write_record(run_dir, record)
        return record, []
    runs.check(saved, ident, run_dir)
    return saved | {"eval": record["eval"]}, runs.diff(saved.get("eval", {}), record["eval"])


def read_metrics(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / runs.METRICS).read_text())
    except (OSError, ValueError) as e:
        raise runs.RunIdentityError(f"{run_dir / runs.METRICS}: unreadable ({e}); delete it to "
                                          "evaluate the run again") from e


if __name__ == "__main__":
    dist.init_from_env()  # torchrun: join the process group before Hydra names the (shared) run directory
    try:
        main()
    finally:
        dist.shutdown()
