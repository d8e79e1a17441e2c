"""The training loop: read ``train`` top to bottom.

``train`` is given a ``Job`` (the model, the two splits, the typed config, the run folder and its record);
``_start`` builds what the loop uses (the ``TrainState``, resumed where a checkpoint says, the data, the
``StepContext``, the ``Evaluation``, the ``Checkpoints``). Each iteration is one ``step``: forward -> guard
against non-finite losses -> backward -> (clip) -> optimizer and LR step -> (the EMA of the weights,
``trainer.ema_decay``: then it is what is evaluated). Every ``log_period`` the metrics window is read once
(the loop's only host sync) and written through the run's writers (``detlib.engine.writers``: TensorBoard,
``metrics.jsonl``, ...) and as a log line with ETA, with the model's diagnostics (shadow losses, foreground
IoU); every ``eval_period`` the val set is evaluated; every
``checkpoint_period`` the whole ``TrainState`` is saved atomically. SIGINT/SIGTERM save at the next step
boundary and raise ``Interrupted`` (the entry point exits 130/143); a second one raises it at once.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detlib import distributed as dist
from detlib import runs as run_record
from detlib.config import Config, TrainerConfig
from detlib.data.coco import CocoDetection, collate
from detlib.data.image import ImageDecodeError
from detlib.data.sampler import TrainBatchSampler
from detlib.device import autocast, autocast_dtype, channels_last, resolve_device, to_device  # noqa: F401
from detlib.engine import checkpoint, dashboard
from detlib.engine.evaluation import Evaluation, evaluate_and_log
from detlib.engine.guards import Interrupted, NonFiniteGuard, NonFiniteLossError, SignalGuard  # noqa: F401
from detlib.engine.state import TrainState, lr_lambda  # noqa: F401 - lr_lambda: part of the trainer's API
from detlib.engine.writers import Writers, open_writers
from detlib.evaluation.coco_eval import format_table
from detlib.evaluation.report import metrics
from detlib.jsonio import write_json
from detlib.runs import METRICS

log = logging.getLogger(__name__)


@dataclass
class RunMeta:
    """What every checkpoint records of its run (``run.json``'s ``identity``, ``eval`` and ``data_files``): a
    checkpoint of another identity is refused on resume."""

    identity: dict = field(default_factory=dict)
    eval: dict = field(default_factory=dict)  # the inference-only settings, recorded in eval_detail.json too
    data_files: dict = field(default_factory=dict)

    @classmethod
    def of(cls, record: Mapping) -> RunMeta:
        return cls(dict(record["identity"]), dict(record.get("eval") or {}), dict(record.get("data_files") or {}))


@dataclass
class Job:
    """What ``train`` trains. Of ``cfg`` it reads ``trainer``, ``optimizer``, ``eval``, ``writer``,
    ``data.batch_size``, ``data.num_workers`` and ``seed`` (the model and its losses are built already);
    ``hparams``: the HParams table's row (``runs.hparams``)."""

    model: nn.Module
    train_set: CocoDetection
    val_set: CocoDetection
    cfg: Config
    run_dir: Path
    meta: RunMeta = field(default_factory=RunMeta)
    hparams: dict | None = None


def train(job: Job) -> dict[str, float | None]:
    """Train ``job.model`` for ``trainer.max_iters`` iterations; return the final COCO stats (12 floats or None).

    Writes ``checkpoints/``, ``eval_detail.json``, ``detections.json``, ``metrics.json`` and what the writers
    write (``tb/``, ``metrics.jsonl``, ...) under ``job.run_dir`` (rank 0 only).
    """
    cfg, main = job.cfg.trainer, dist.is_main()
    loop = _start(job)
    state, bar, histograms = loop.state, loop.bar, None
    try:
        with SignalGuard(state.iteration) as signals, logging_redirect_tqdm():
            for images, targets in loop.loader:
                images, targets = to_device(loop.device, images, targets)
                log_now = (state.iteration + 1) % cfg.log_period == 0 or state.iteration + 1 == cfg.max_iters
                try:
                    result = step(state, loop.step, images, targets, signals.signum is not None, log_now)
                except torch.cuda.OutOfMemoryError:
                    log.error("out of memory at iteration %d: %s", state.iteration + 1, _batch_size_note(state.model, images))
                    raise
                bar.update(1)
                done = state.iteration
                if result.skipped:
                    continue
                eval_now = bool(cfg.eval_period) and done % cfg.eval_period == 0 and done < cfg.max_iters
                save_now = (bool(cfg.checkpoint_period) and done % cfg.checkpoint_period == 0) \
                    or done == cfg.max_iters or result.stopping
                if log_now or eval_now or save_now:
                    loop.step.guard.raise_if_bad(done)  # deferred on CUDA: nothing non-finite is logged or saved
                if log_now:
                    means = state.window.flush()  # on every rank: averaged over them
                    histograms = _log_step(state, means, result, loop, cfg.max_iters) if main else None
                if eval_now:
                    evaluate_and_log(loop.evaluation, state.evaluated, done, histograms)
                if save_now:
                    signals.saved_at = loop.checkpoints.save(state, loop.loader.batch_sampler)
                if result.stopping:
                    raise Interrupted(signals.signum or signal.SIGTERM, done)  # no signal here: another rank's
            bar.close()
            if loop.resumed is not None and loop.resumed >= cfg.max_iters:
                log.info("already trained %d iterations; evaluating only", loop.resumed)
            rate = state.window.rate(state.iteration)
            stats = evaluate_and_log(loop.evaluation, state.evaluated, cfg.max_iters, histograms)
        if main:
            _finish(job, loop.writers, stats, rate)
    except ImageDecodeError:  # data.invalid=error met an image it cannot decode: keep what was trained
        if dist.world_size() == 1 and state.iteration > signals.saved_at:  # (under DDP the others can't join)
            loop.checkpoints.save(state, loop.loader.batch_sampler)
            log.error("saved a checkpoint at iteration %d before stopping on an undecodable image", state.iteration)
        raise
    finally:
        bar.close()
        loop.writers.close()
    return stats


@dataclass
class Checkpoints:
    """Where ``train`` saves the whole state: ``folder`` (``RUN/checkpoints``), the newest ``keep_last`` numbered
    files kept. Rotation deletes only this run's files (``owned``: those it writes, and on resume those of its
    identity before), never another run's."""

    folder: Path
    keep_last: int
    meta: RunMeta
    owned: set[Path] = field(default_factory=set)

    def save(self, state: TrainState, sampler: TrainBatchSampler) -> int:
        """Checkpoint the whole state (every rank's RNGs, so resume is exact under DDP); rank 0 writes."""
        rngs = dist.gather_objects(checkpoint.rng_state())
        if dist.is_main():
            it = state.iteration
            checkpoint.save(state.state_dict() | dict(
                epoch=it // sampler.batches_per_epoch(), rng=rngs[0], rng_per_rank=rngs, meta=asdict(self.meta),
                sampler=dict(seed=sampler.seed, batch_size=sampler.batch_size, world_size=dist.world_size(),
                             next_iteration=it)), self.folder, it, self.keep_last, self.owned)
        return state.iteration


@dataclass
class _Loop:
    """What ``train`` builds before its first step (``_start``)."""

    device: torch.device
    state: TrainState
    step: StepContext
    loader: DataLoader
    evaluation: Evaluation
    checkpoints: Checkpoints
    bar: tqdm
    writers: Writers  # rank 0's; none on the other ranks
    resumed: int | None  # the iteration a checkpoint continued from; None: a fresh start


def _start(job: Job) -> _Loop:
    """The state (resumed where ``trainer.resume`` finds a checkpoint), the step's parts, the data from the
    state's iteration on, the evaluation and the checkpoints of ``job``."""
    cfg, run_dir, main = job.cfg.trainer, Path(job.run_dir), dist.is_main()
    device = resolve_device(cfg.device)
    amp_dtype = autocast_dtype(cfg.amp)
    model = _prepare(job.model, device, cfg, fixed_input_size(job.model, job.train_set))
    state = TrainState.create(model, cfg, device, job.cfg.optimizer)
    folder = run_record.checkpoints(run_dir)
    resumed = resume(state, cfg.resume, folder, job.meta, device)
    owned = set() if resumed is None else checkpoint.run_files(folder, job.meta.identity, resumed)
    net = DistributedDataParallel(job.model, device_ids=[device] if device.type == "cuda" else None) \
        if dist.world_size() > 1 else job.model  # after loading, so every rank starts from the same weights
    writers = open_writers(job.cfg.writer, run_dir, state.iteration) if main else Writers()
    noise = {f"train/noise/{k}": float(v) for k, v in job.train_set.noise_stats.items()}  # the realised noise
    if noise and state.iteration == 0:
        writers.write(0, noise)
    num_workers = default_num_workers(device) if job.cfg.data.num_workers is None else job.cfg.data.num_workers
    loader = _loader(job.train_set, job.cfg.data.batch_size, num_workers, job.cfg.seed, state.iteration,
                     cfg.max_iters, device)
    if state.ema is not None:
        log.info("evaluating the EMA of the weights (decay %g); checkpoints keep both", state.ema.decay)
    guard = NonFiniteGuard(cfg.on_nonfinite, cfg.max_nonfinite, run_dir, job.train_set, deferred=device.type == "cuda")
    evaluation = Evaluation(job.val_set, job.cfg.eval, device, run_dir, amp_dtype, writers, job.meta.eval,
                            weights="model" if state.ema is None else "ema")
    bar = tqdm(total=cfg.max_iters, initial=state.iteration, disable=None if cfg.progress and main else True,
               dynamic_ncols=True, desc="train")
    job.model.train()
    return _Loop(device, state, StepContext(net, amp_dtype, cfg.clip_grad_norm, guard), loader, evaluation,
                 Checkpoints(folder, cfg.keep_last, job.meta, owned), bar, writers, resumed)


def _batch_size_note(model: nn.Module, images: list) -> str:
    """What an out-of-memory step was at: the batch size, the images' sizes and the model's resize."""
    sizes = sorted({tuple(im.shape[-2:]) for im in images})
    resize = f"min_size {list(model.min_size)}, max_size {model.max_size}" if hasattr(model, "max_size") else ""
    return (f"batch of {len(images)} images (data.batch_size), input sizes {sizes}, resized to {resize}; "
            "lower data.batch_size or model.min_size/max_size, or use trainer.amp=bf16")


@dataclass
class StepContext:
    """How ``step`` runs: the network it calls (the model, or its DDP wrapper under torchrun), the autocast
    dtype (None: float32), the gradient-norm limit (``trainer.clip_grad_norm``) and the non-finite guard."""

    net: nn.Module
    amp_dtype: torch.dtype | None
    clip_grad_norm: float | None
    guard: NonFiniteGuard


@dataclass
class StepResult:
    out: dict  # the model's output: losses, diagnostics
    skipped: bool  # a non-finite loss under on_nonfinite=skip: no update
    stopping: bool  # a stop was asked for (on any rank)


def step(state: TrainState, ctx: StepContext, images: list, targets: list, stop_asked: bool = False,
         log_now: bool = False) -> StepResult:
    """One iteration: forward (diagnostics on log steps), non-finite guard, backward, optimizer, EMA, LR step."""
    device = images[0].device
    with autocast(device, ctx.amp_dtype):
        out = ctx.net(images, targets, diagnostics=log_now)
    loss = sum(out["losses"].values())
    bad_here, bad, stopping = ctx.guard.check(loss, stop_asked, device, state.iteration)
    if bad:
        ctx.guard.handle(state.iteration, bad_here, out, targets)  # raises, unless this step is to be skipped
        state.optimizer.zero_grad(set_to_none=True)
    else:
        ctx.guard.in_row = 0
        optimizer_step(loss, state.optimizer, state.scaler, state.params, ctx.clip_grad_norm)
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


def _log_step(state: TrainState, means_t: dict, result: StepResult, loop: _Loop, max_iters: int) -> dict:
    """Scalars (to the writers), diagnostics and the log line of a log step (rank 0); returns the histogram
    diagnostics."""
    done = state.iteration
    means = {k: float(v) for k, v in means_t.items()}  # the one sync per log period
    means["loss"] = sum(means.values())
    diagnostics = result.out.get("diagnostics") or {}
    scalars = {run_record.loss_tag(k): v for k, v in means.items()} | {run_record.LR_TAG: state.lr}  # loss/*, lr
    scalars |= dashboard.grad_norms(state.model) | {k: float(v) for k, v in diagnostics.items() if v.dim() == 0}
    rate = state.window.rate(done)
    loop.writers.write(done, scalars, it_per_s=rate)
    loop.bar.set_postfix(loss=f"{means['loss']:.3f}", box=f"{means.get('loss_box_reg', float('nan')):.3f}")
    terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
    eta = (max_iters - done) / max(rate, 1e-9)
    log.info("iter %d/%d  loss %.4f (%s)  lr %.5f  %.2f it/s  eta %02d:%02d:%02d", done, max_iters, means["loss"],
             terms, state.lr, rate, eta // 3600, eta % 3600 // 60, eta % 60)
    return {k: v for k, v in diagnostics.items() if v.dim() == 1 and not k.startswith("dump/")}


def _finish(job: Job, writers: Writers, stats: dict, rate: float) -> None:
    max_iters = job.cfg.trainer.max_iters
    if job.hparams and writers.tensorboard is not None:
        dashboard.log_hparams(writers.tensorboard, job.hparams, stats, max_iters)
    write_json(Path(job.run_dir) / METRICS, metrics(stats))
    world = dist.world_size()
    log.info("\n%s", format_table(stats, f"COCO box evaluation on {len(job.val_set)} val images after {max_iters} "
                                         f"iterations ({rate:.2f} it/s, {world} process{'es' if world > 1 else ''})"))


def resume(state: TrainState, resume_from: str, ckpt_dir: Path, meta: RunMeta, device: torch.device) -> int | None:
    """Load the checkpoint ``resume_from`` names (``auto``: this run's last, if any) into ``state``; returns
    its iteration, or None when starting fresh. A checkpoint of another run identity is refused."""
    found = _resume_path(resume_from, ckpt_dir)
    if found is None:
        return None
    path, saved = found
    _check_resume_identity(saved.get("meta", {}), meta.identity, path)
    state.load_state_dict(saved, device)
    per_rank = saved.get("rng_per_rank") or []
    checkpoint.set_rng_state(per_rank[dist.rank()] if len(per_rank) == dist.world_size() else saved["rng"])
    log.info("resumed from %s at iteration %d", path, state.iteration)
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


def _check_resume_identity(saved: dict, identity: dict, path: Path) -> None:
    """Refuse a checkpoint of another run: every key of the run identity must match (the message names
    only the differing ones). Inference-only settings are not part of the identity."""
    if "identity" not in saved:
        raise checkpoint.CheckpointError(
            f"{path} has no run identity (written by an older detlib): it cannot be continued as this run")
    diffs = run_record.diff(saved["identity"], identity)
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
