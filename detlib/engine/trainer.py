"""The training loop: read ``train`` top to bottom.

Each iteration is one ``step``: forward -> guard against non-finite losses -> backward -> (clip) ->
optimizer and LR step -> (the EMA of the weights, ``trainer.ema_decay``: then it is what is evaluated). Every ``log_period`` the metrics window is read once (the loop's only host
sync) and written as TensorBoard scalars and a log line with ETA, with the model's diagnostics (shadow
losses, foreground IoU); every ``eval_period`` the val set is evaluated; every ``checkpoint_period``
the whole ``TrainState`` is saved atomically. SIGINT/SIGTERM save at the next step boundary and raise
``Interrupted`` (the entry point exits 130/143); a second one raises it at once.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detlib import distributed as dist
from detlib import runs as run_record
from detlib.config import EvalConfig, TrainerConfig
from detlib.data.coco import CocoDetection, collate
from detlib.data.image import ImageDecodeError
from detlib.data.sampler import TrainBatchSampler
from detlib.device import autocast, autocast_dtype, channels_last, resolve_device, to_device  # noqa: F401
from detlib.engine import checkpoint, dashboard
from detlib.engine.evaluation import evaluate_and_log
from detlib.engine.guards import Interrupted, NonFiniteGuard, NonFiniteLossError, SignalGuard  # noqa: F401
from detlib.engine.state import TrainState, lr_lambda  # noqa: F401 - lr_lambda: part of the trainer's API
from detlib.evaluation.coco_eval import format_table
from detlib.evaluation.report import metrics
from detlib.jsonio import append_jsonl, truncate_jsonl, write_json
from detlib.runs import METRICS, METRICS_JSONL

log = logging.getLogger(__name__)


def train(
    model: nn.Module, train_set: CocoDetection, val_set: CocoDetection, cfg: TrainerConfig, eval_cfg: EvalConfig,
    run_dir: str | Path, batch_size: int, num_workers: int | None = 0, seed: int = 0, meta: dict | None = None,
    hparams: dict | None = None,
) -> dict[str, float | None]:
    """Train ``model`` for ``cfg.max_iters`` iterations; return the final COCO stats (12 floats or None).

    ``meta``: the run's record (``identity``, ``eval``; see ``run_record``), stored in every checkpoint; a
    checkpoint of another identity is refused. ``hparams``: the HParams table's row. Writes ``tb/``,
    ``checkpoints/``, ``eval_detail.json`` and ``metrics.json`` under ``run_dir`` (rank 0 only).
    """
    run_dir, meta, main = Path(run_dir), dict(meta or {}), dist.is_main()
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.amp)
    state = TrainState.create(_prepare(model, device, cfg, fixed_input_size(model, train_set)), cfg, device)
    num_workers = default_num_workers(device) if num_workers is None else num_workers
    resumed = resume(state, cfg.resume, run_dir / "checkpoints", meta, device)
    # Rotation deletes only this run's checkpoints: those it writes, and on resume those of its identity before.
    owned = set() if resumed is None else checkpoint.run_files(run_dir / "checkpoints", meta.get("identity"), resumed)
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) \
        if dist.world_size() > 1 else model  # after loading, so every rank starts from the same weights
    writer = _open_writer(run_dir, state.iteration, train_set) if main else None
    loader = _loader(train_set, batch_size, num_workers, seed, state.iteration, cfg.max_iters, device)
    save = partial(_save, state, run_dir / "checkpoints", cfg.keep_last, meta, loader.batch_sampler, owned)
    if state.ema is not None:
        log.info("evaluating the EMA of the weights (decay %g); checkpoints keep both", state.ema.decay)
    evaluate_now = partial(evaluate_and_log, state.evaluated, val_set, device, eval_cfg, amp_dtype, writer=writer,
                           run_dir=run_dir, eval_settings=meta.get("eval", {}),
                           weights="model" if state.ema is None else "ema")
    guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite, run_dir, train_set, deferred=device.type == "cuda")
    bar = tqdm(total=cfg.max_iters, initial=state.iteration, disable=None if cfg.progress and main else True,
               dynamic_ncols=True, desc="train")
    histograms = None
    model.train()
    try:
        with SignalGuard(state.iteration) as signals, logging_redirect_tqdm():
            for images, targets in loader:
                images, targets = to_device(device, images, targets)
                log_now = (state.iteration + 1) % cfg.log_period == 0 or state.iteration + 1 == cfg.max_iters
                try:
                    result = step(state, net, images, targets, cfg, amp_dtype, guard, signals.signum is not None,
                                  log_now)
                except torch.cuda.OutOfMemoryError:
                    log.error("out of memory at iteration %d: %s", state.iteration + 1, _batch_size_note(model, images))
                    raise
                bar.update(1)
                done = state.iteration
                if result.skipped:
                    continue
                eval_now = bool(cfg.eval_period) and done % cfg.eval_period == 0 and done < cfg.max_iters
                save_now = (bool(cfg.checkpoint_period) and done % cfg.checkpoint_period == 0) \
                    or done == cfg.max_iters or result.stopping
                if log_now or eval_now or save_now:
                    guard.raise_if_bad(done)  # deferred on CUDA: nothing non-finite is logged or saved
                if log_now:
                    means = state.window.flush()  # on every rank: averaged over them
                    histograms = _log_step(state, means, result, writer, bar, cfg.max_iters,
                                           run_dir) if main else None
                if eval_now:
                    evaluate_now(done, histograms=histograms)
                if save_now:
                    signals.saved_at = save()
                if result.stopping:
                    raise Interrupted(signals.signum or signal.SIGTERM, done)  # no signal here: another rank's
            bar.close()
            if resumed is not None and resumed >= cfg.max_iters:
                log.info("already trained %d iterations; evaluating only", resumed)
            rate = state.window.rate(state.iteration)
            stats = evaluate_now(cfg.max_iters, histograms=histograms)
        if main:
            _finish(run_dir, writer, hparams, stats, cfg.max_iters, len(val_set), rate)
    except ImageDecodeError:  # data.invalid=error met an image it cannot decode: keep what was trained
        if dist.world_size() == 1 and state.iteration > signals.saved_at:  # (under DDP the others can't join)
            save()
            log.error("saved a checkpoint at iteration %d before stopping on an undecodable image", state.iteration)
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    return stats


def _batch_size_note(model: nn.Module, images: list) -> str:
    """What an out-of-memory step was at: the batch size, the images' sizes and the model's resize."""
    sizes = sorted({tuple(im.shape[-2:]) for im in images})
    resize = f"min_size {list(model.min_size)}, max_size {model.max_size}" if hasattr(model, "max_size") else ""
    return (f"batch of {len(images)} images (data.batch_size), input sizes {sizes}, resized to {resize}; "
            "lower data.batch_size or model.min_size/max_size, or use trainer.amp=bf16")


@dataclass
class StepResult:
    out: dict  # the model's output: losses, diagnostics
    skipped: bool  # a non-finite loss under on_nonfinite=skip: no update
    stopping: bool  # a stop was asked for (on any rank)


def step(state: TrainState, net: nn.Module, images: list, targets: list, cfg: TrainerConfig,
         amp_dtype: torch.dtype | None, guard: NonFiniteGuard, stop_asked: bool, log_now: bool) -> StepResult:
    """One iteration: forward (diagnostics on log steps), non-finite guard, backward, optimizer, EMA, LR step."""
    device = images[0].device
    with autocast(device, amp_dtype):
        out = net(images, targets, diagnostics=log_now)
    loss = sum(out["losses"].values())
    bad_here, bad, stopping = guard.check(loss, stop_asked, device, state.iteration)
    if bad:
        guard.handle(state.iteration, bad_here, out, targets)  # raises, unless this step is to be skipped
        state.optimizer.zero_grad(set_to_none=True)
    else:
        guard.in_row = 0
        optimizer_step(loss, state.optimizer, state.scaler, state.optimizer.param_groups[0]["params"],
                       cfg.clip_grad_norm)
        state.window.add(out["losses"])
        if state.ema is not None:
            state.ema.update(state.model)
    state.scheduler.step()
    state.iteration += 1
    return StepResult(out, bad, stopping)


def optimizer_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    params: list[torch.nn.Parameter], clip_grad_norm: float | None,
) -> None:
    """Backward and step. With fp16 the scaler skips a step whose gradients overflowed; clipping
    happens after unscaling, so the norm limit applies to the true gradients."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()


def _log_step(state: TrainState, means_t: dict, result: StepResult, writer: SummaryWriter, bar: tqdm,
              max_iters: int, run_dir: Path) -> dict:
    """Scalars (TensorBoard and a ``metrics.jsonl`` line), diagnostics and the log line of a log step (rank 0);
    returns the histogram diagnostics."""
    done = state.iteration
    means = {k: float(v) for k, v in means_t.items()}  # the one sync per log period
    means["loss"] = sum(means.values())
    diagnostics = result.out.get("diagnostics") or {}
    scalars = {run_record.loss_tag(k): v for k, v in means.items()} | {run_record.LR_TAG: state.lr}  # loss/*, lr
    scalars |= dashboard.grad_norms(state.model) | {k: float(v) for k, v in diagnostics.items() if v.dim() == 0}
    for k, v in scalars.items():
        writer.add_scalar(k, v, done)
    rate = state.window.rate(done)
    append_jsonl(run_dir / METRICS_JSONL, {"iteration": done, "time": time.time(), "it_per_s": rate} | scalars)
    bar.set_postfix(loss=f"{means['loss']:.3f}", box=f"{means.get('loss_box_reg', float('nan')):.3f}")
    terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
    eta = (max_iters - done) / max(rate, 1e-9)
    log.info("iter %d/%d  loss %.4f (%s)  lr %.5f  %.2f it/s  eta %02d:%02d:%02d", done, max_iters, means["loss"],
             terms, state.lr, rate, eta // 3600, eta % 3600 // 60, eta % 60)
    return {k: v for k, v in diagnostics.items() if v.dim() == 1 and not k.startswith("dump/")}


def _finish(run_dir: Path, writer: SummaryWriter, hparams: dict | None, stats: dict, max_iters: int,
            num_val: int, rate: float) -> None:
    if hparams:
        dashboard.log_hparams(writer, hparams, stats, max_iters)
    write_json(run_dir / METRICS, metrics(stats))
    world = dist.world_size()
    log.info("\n%s", format_table(stats, f"COCO box evaluation on {num_val} val images after {max_iters} "
                                         f"iterations ({rate:.2f} it/s, {world} process{'es' if world > 1 else ''})"))


def resume(state: TrainState, resume_from: str, ckpt_dir: Path, meta: dict, device: torch.device) -> int | None:
    """Load the checkpoint ``resume_from`` names (``auto``: this run's last, if any) into ``state``; returns
    its iteration, or None when starting fresh. A checkpoint of another run identity is refused."""
    found = _resume_path(resume_from, ckpt_dir)
    if found is None:
        return None
    path, saved = found
    _check_resume_identity(saved.get("meta", {}), meta, path)
    state.load_state_dict(saved, device)
    per_rank = saved.get("rng_per_rank") or []
    checkpoint.set_rng_state(per_rank[dist.rank()] if len(per_rank) == dist.world_size() else saved["rng"])
    log.info("resumed from %s at iteration %d", path, state.iteration)
    return state.iteration


def _save(state: TrainState, ckpt_dir: Path, keep_last: int, meta: dict, sampler: TrainBatchSampler,
          owned: set[Path]) -> int:
    """Checkpoint the whole state (every rank's RNGs, so resume is exact under DDP); rank 0 writes."""
    rngs = dist.gather_objects(checkpoint.rng_state())
    if dist.is_main():
        it = state.iteration
        checkpoint.save(state.state_dict() | dict(
            epoch=it // sampler.batches_per_epoch(), rng=rngs[0], rng_per_rank=rngs, meta=meta,
            sampler=dict(seed=sampler.seed, batch_size=sampler.batch_size, world_size=dist.world_size(),
                         next_iteration=it)), ckpt_dir, it, keep_last, owned)
    return state.iteration


def _resume_path(resume: str, ckpt_dir: Path) -> tuple[Path, dict] | None:
    """The checkpoint to resume from, loaded; None: start fresh."""
    if not resume or resume == "new":  # new: a fresh run (in a new folder: run_record.run_dir)
        return None
    if resume == "auto":
        found = checkpoint.discover(ckpt_dir)  # last.pt, or the newest intact numbered one (named)
        if found is None:
            log.info("trainer.resume=auto: no checkpoint in %s yet, starting fresh", ckpt_dir)
        return found
    path = Path(resume).expanduser()
    if not path.is_file():
        raise checkpoint.CheckpointError(
            f"trainer.resume={resume}: no checkpoint there (use trainer.resume=auto to start fresh when none exists)")
    return path, checkpoint.load(path)


def _check_resume_identity(saved: dict, current: dict, path: Path) -> None:
    """Refuse a checkpoint of another run: every key of the run identity must match (the message names
    only the differing ones). Inference-only settings are not part of the identity."""
    if "identity" not in saved:
        raise checkpoint.CheckpointError(
            f"{path} has no run identity (written by an older detlib): it cannot be continued as this run")
    diffs = run_record.diff(saved["identity"], current.get("identity", {}))
    if diffs:
        raise checkpoint.CheckpointError(f"{path} belongs to a run with a different set-up:\n  "
                                         + "\n  ".join(diffs) + "\nresume it with its own set-up, or start "
                                         "the new one in a new run directory")


def _loader(dataset: CocoDetection, batch_size: int, num_workers: int, seed: int, start: int, max_iters: int,
            device: torch.device) -> DataLoader:
    """Batches from iteration ``start`` on: a function of (seed, iteration), so resume sees the same data."""
    sampler = TrainBatchSampler(len(dataset), batch_size, seed, start, max_iters, dist.rank(), dist.world_size(),
                                group_ids=getattr(dataset, "group_ids", None))  # aspect-ratio groups if asked
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                      generator=torch.Generator().manual_seed(seed))


def _open_writer(run_dir: Path, start: int, train_set: CocoDetection) -> SummaryWriter:
    # Steps after the checkpoint that a killed run had already logged are dropped, not duplicated.
    truncate_jsonl(run_dir / METRICS_JSONL, start)
    writer = SummaryWriter(str(run_dir / run_record.TB), purge_step=start + 1 if start else None)
    for k, v in (getattr(train_set, "noise_stats", None) or {}).items():  # the realised annotation noise
        writer.add_scalar(f"train/noise/{k}", float(v), 0)
    return writer


def _prepare(model: nn.Module, device: torch.device, cfg: TrainerConfig, fixed_size: bool = False) -> nn.Module:
    model.to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = fixed_size if cfg.cudnn_benchmark is None else cfg.cudnn_benchmark
    return channels_last(model, cfg.channels_last)  # on the CPU too: oneDNN's NHWC convolutions are faster


def fixed_input_size(model: nn.Module, dataset: CocoDetection) -> bool:
    """Whether every training batch reaches the backbone at one size (so cuDNN's benchmark pays off): one
    training scale and one image size in the dataset, as in the built-in data."""
    scales = set(getattr(model, "min_size", ()) or ())
    sizes = {(im.get("width"), im.get("height")) for im in dataset.coco.imgs.values()}
    return len(scales) <= 1 and len(sizes) == 1


def default_num_workers(device: torch.device) -> int:
    """``data.num_workers=null``: no workers on CPU (decoding beside training was slower on 2 cores); on CUDA
    the cores this process can share (one left for the main process), at most 8."""
    if device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(8, cores // max(1, dist.local_world_size()) - 1))
