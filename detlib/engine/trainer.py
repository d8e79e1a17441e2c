"""The training loop: read it top to bottom.

``train(...)`` resumes if asked, then for each iteration: batch -> forward -> losses -> guard
against non-finite values -> backward -> (clip) -> step. Every ``log_period`` it reads the
accumulated losses once (the only host sync of the loop) and writes TensorBoard scalars and a log
line with ETA; every ``eval_period`` it evaluates with pycocotools; every ``checkpoint_period`` it
saves atomically. SIGTERM and SIGINT save a checkpoint at the next step boundary and raise
``Interrupted`` (the entry point exits 130/143); a second one raises it at once.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from detlib.config import EvalConfig, TrainerConfig
from detlib.data.coco import CocoDetection, collate
from detlib.data.image import ImageDecodeError
from detlib.data.sampler import TrainBatchSampler
from detlib.engine import checkpoint, dashboard, run_record
from detlib.engine import distributed as dist
from detlib.evaluation.coco_eval import STAT_NAMES, ap_per_iou, format_table, per_class_ap
from detlib.evaluation.inference import evaluate
from detlib.evaluation.shadow import shadow_metrics
from detlib.evaluation.voc_eval import voc07_ap50

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


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present. Under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config: trainer.device={name} but CUDA is not available (use trainer.device=auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def lr_lambda(cfg: TrainerConfig):
    """Linear warmup from ``warmup_factor``, then cosine to 0 or steps of ``gamma``."""
    milestones = [int(s * cfg.max_iters) for s in cfg.steps]

    def f(it: int) -> float:
        warm = 1.0
        if it < cfg.warmup_iters:
            a = it / cfg.warmup_iters
            warm = cfg.warmup_factor * (1 - a) + a
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(it / cfg.max_iters, 1.0)))
        return warm * cfg.gamma ** sum(it >= m for m in milestones)

    return f


def _autocast_dtype(amp: str) -> torch.dtype | None:
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def _to(device: torch.device, images: list, targets: list) -> tuple[list, list]:
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


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


def _resolve_resume(resume: str, ckpt_dir: Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        last = ckpt_dir / "last.pt"
        if last.is_file():
            return last
        log.info("trainer.resume=auto: no checkpoint in %s yet, starting fresh", ckpt_dir)
        return None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise checkpoint.CheckpointError(
            f"trainer.resume={resume}: no checkpoint there (use trainer.resume=auto to start fresh when none exists)")
    return path


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


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def train(
    model: nn.Module,
    train_set: CocoDetection,
    val_set: CocoDetection,
    cfg: TrainerConfig,
    eval_cfg: EvalConfig,
    run_dir: str | Path,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    meta: dict | None = None,
    hparams: dict | None = None,
    voc07: bool = False,
) -> dict[str, float | None]:
    """Train ``model`` for ``cfg.max_iters`` iterations and return the final COCO stats.

    ``meta``: the run's record (``identity``, see ``run_record``); stored in every checkpoint, and a
    checkpoint of another identity is refused on resume. ``hparams``: flat parameters for TensorBoard's
    HParams table. Writes ``tb/``, ``checkpoints/`` and ``metrics.json`` under ``run_dir``. ``voc07``:
    also report VOC07 11-point AP50. SIGINT/SIGTERM save a checkpoint and raise ``Interrupted``; a
    second signal raises it at once.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    device = resolve_device(cfg.device)
    amp_dtype = _autocast_dtype(cfg.amp)
    model.to(device)
    if device.type == "cuda":  # the GPU fast path; CPU convolutions gain nothing from either
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        if cfg.channels_last:
            model.backbone.to(memory_format=torch.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    meta = dict(meta or {})
    rank, world = dist.rank(), dist.world_size()
    main = rank == 0  # under DDP only rank 0 writes logs, TensorBoard, checkpoints and metrics

    # ---- resume
    start_iter, accum, count = 0, {}, 0
    resume_path = _resolve_resume(cfg.resume, ckpt_dir)
    if resume_path is not None:
        state = checkpoint.load(resume_path)
        _check_resume_identity(state.get("meta", {}), meta, resume_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        per_rank = state.get("rng_per_rank") or []
        checkpoint.set_rng_state(per_rank[rank] if len(per_rank) == world else state["rng"])
        start_iter = state["iteration"]
        accum = {k: v.to(device) for k, v in state["log_accum"].items()}
        count = state["log_count"]
        log.info("resumed from %s at iteration %d", resume_path, start_iter)

    # DDP after loading, so every rank starts from the same weights (DDP also broadcasts rank 0's).
    # All parameters take part in every step (an empty foreground still gives a 0 loss with a graph),
    # so find_unused_parameters stays off.
    net = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None) if world > 1 else model
    # Steps after the checkpoint that a killed run had already logged are dropped, not duplicated.
    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_iter + 1 if resume_path else None) if main else None
    if main and getattr(train_set, "noise_stats", None):  # the realised annotation noise, for the record
        for k, v in train_set.noise_stats.items():
            writer.add_scalar(f"data/noise/{k}", float(v), 0)
    sampler = TrainBatchSampler(len(train_set), batch_size, seed, start_iter, cfg.max_iters, rank, world,
                                group_ids=getattr(train_set, "group_ids", None))  # aspect-ratio groups if asked
    loader = DataLoader(
        train_set, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
        pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(seed))

    def save(iteration: int) -> None:
        rngs = dist.gather_objects(checkpoint.rng_state())  # every rank's RNGs, so resume is exact under DDP
        if not main:
            return
        state = dict(
            model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            scaler=scaler.state_dict(), iteration=iteration, epoch=iteration // sampler.batches_per_epoch(),
            rng=rngs[0], rng_per_rank=rngs, log_accum={k: v.cpu() for k, v in accum.items()}, log_count=count,
            sampler=dict(seed=seed, batch_size=batch_size, world_size=world, next_iteration=iteration), meta=meta)
        checkpoint.save(state, ckpt_dir, iteration, cfg.keep_last)

    def run_eval(iteration: int, last_out: dict | None) -> dict:
        t0 = time.perf_counter()
        log.info("evaluating %d val images at iteration %d", len(val_set), iteration)
        stats, val_losses, results, E = evaluate(  # every rank evaluates its shard; stats on all ranks
            model, val_set, device, eval_cfg.batch_size, tuple(eval_cfg.max_dets), amp_dtype, eval_cfg.backend)
        if not main:
            return stats
        extra = {}
        if voc07:  # results are the gathered ones on rank 0
            voc = voc07_ap50(results, val_set.coco)
            writer.add_scalar("val/VOC07_AP50", float("nan") if voc["mAP"] is None else voc["mAP"], iteration)
            extra["voc07_ap50"] = voc
        for k, v in stats.items():
            writer.add_scalar(f"val/{k}", float("nan") if v is None else v, iteration)
        for k, v in val_losses.items():
            writer.add_scalar(f"val/{k}", v, iteration)
        dashboard.log_eval(writer, iteration, E, val_set, model, device)
        if last_out is not None:  # the last training step's RoIs
            dashboard.log_histograms(writer, iteration, model.roi_head, last_out)
        writer.flush()
        names = {c: val_set.coco.cats[c]["name"] for c in val_set.cat_ids}
        _write_json(run_dir / "eval_detail.json", {
            "iteration": iteration, "stats": stats, "val_losses": val_losses,
            "ap_per_iou": ap_per_iou(E), "per_class_ap": per_class_ap(E, names),
            "eval_settings": meta.get("eval", {}), **extra})
        log.info("eval @ %d (%.1fs): AP %.4f AP50 %.4f AP75 %.4f  val loss %.4f", iteration,
                 time.perf_counter() - t0, stats["AP"] or 0, stats["AP50"] or 0, stats["AP75"] or 0,
                 val_losses.get("loss", float("nan")))
        return stats

    stop = {"signal": None, "saved_at": start_iter}

    def on_signal(signum, _frame):
        if stop["signal"] is not None:  # the second one: abort now, even mid-evaluation
            raise Interrupted(signum, stop["saved_at"], aborted=True)
        stop["signal"] = signum
        log.warning("%s: saving a checkpoint and stopping at the next step boundary (after an evaluation in "
                    "progress); send it again to abort at once", signal.Signals(signum).name)

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}

    # ---- loop
    model.train()
    nonfinite_in_row, done = 0, start_iter
    t_start, it_start = time.perf_counter(), start_iter
    bar = tqdm(total=cfg.max_iters, initial=start_iter, disable=None if cfg.progress and main else True,
               dynamic_ncols=True, desc="train")
    stats: dict = {}
    out = None
    try:
        with logging_redirect_tqdm():
            for it, (images, targets) in enumerate(loader, start=start_iter):
                images, targets = _to(device, images, targets)
                with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                    out = net(images, targets)
                losses = out["losses"]
                loss = sum(losses.values())

                # One scalar read per step: the guard needs it now. Under DDP every rank must take the
                # same branch, so the non-finite and stop flags are OR-ed over ranks (one all-reduce).
                bad_here = not torch.isfinite(loss)
                stopping = stop["signal"] is not None
                if world > 1:
                    flags = dist.any_true(torch.tensor([bad_here, stopping], device=device))
                    bad, stopping = bool(flags[0]), bool(flags[1])
                else:
                    bad = bad_here
                if bad:
                    nonfinite_in_row += 1
                    detail = (_describe_nonfinite(it, losses, targets, train_set, out, run_dir) if bad_here else
                              f"non-finite loss on another rank at iteration {it + 1} (this is rank {rank})")
                    if cfg.on_nonfinite == "stop" or nonfinite_in_row >= cfg.max_nonfinite:
                        raise NonFiniteLossError(detail)
                    log.warning("skipping step: %s", detail)
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    bar.update(1)
                    continue
                nonfinite_in_row = 0

                done = it + 1
                log_step = done % cfg.log_period == 0 or done == cfg.max_iters
                # Gradients are still scaled after the step unless clipping unscaled them.
                grad_scale = scaler.get_scale() if log_step and scaler.is_enabled() and not cfg.clip_grad_norm else 1.0
                optimizer_step(loss, optimizer, scaler, params, cfg.clip_grad_norm)
                scheduler.step()

                for k, v in losses.items():
                    accum[k] = accum.get(k, 0) + v.detach().float()
                count += 1
                bar.update(1)

                if log_step:
                    means_t = dist.mean_over_ranks({k: v / count for k, v in accum.items()})
                    accum, count = {}, 0
                if log_step and main:
                    for k, v in dashboard.grad_norms(model, grad_scale).items():
                        writer.add_scalar(k, v, done)
                    means = {k: float(v) for k, v in means_t.items()}  # the one sync per log period
                    means["loss"] = sum(means.values())
                    for k, v in means.items():
                        writer.add_scalar(f"train/{k}", v, done)
                    if "sampled" in out:  # this step's RoIs, measured by every loss (no backprop)
                        for k, v in shadow_metrics(model.roi_head, out["deltas"], out["sampled"]).items():
                            writer.add_scalar(k, float(v), done)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], done)
                    rate = (done - it_start) / (time.perf_counter() - t_start)
                    eta = (cfg.max_iters - done) / max(rate, 1e-9)
                    bar.set_postfix(loss=f"{means['loss']:.3f}", box=f"{means['loss_box_reg']:.3f}")
                    terms = "  ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
                    log.info("iter %d/%d  loss %.4f (%s)  lr %.5f  %.2f it/s  eta %s", done, cfg.max_iters,
                             means["loss"], terms, optimizer.param_groups[0]["lr"], rate,
                             time.strftime("%H:%M:%S", time.gmtime(eta)))
                if cfg.eval_period and done % cfg.eval_period == 0 and done < cfg.max_iters:
                    run_eval(done, out)
                if (cfg.checkpoint_period and done % cfg.checkpoint_period == 0) or done == cfg.max_iters:
                    save(done)
                    stop["saved_at"] = done
                if stopping:
                    if stop["saved_at"] != done:
                        save(done)
                    raise Interrupted(stop["signal"] or signal.SIGTERM, done)  # no signal here: another rank's
        bar.close()
        if start_iter >= cfg.max_iters:
            log.info("already trained %d iterations; evaluating only", start_iter)
        train_time = time.perf_counter() - t_start
        stats = run_eval(cfg.max_iters, out)
        if main:
            if hparams:
                dashboard.log_hparams(writer, hparams, stats, cfg.max_iters)
            _write_json(run_dir / "metrics.json", {k: stats[k] for k in STAT_NAMES})
            print("\n" + format_table(stats, f"COCO box evaluation on {len(val_set)} val images after "
                                      f"{cfg.max_iters} iterations ({train_time / 60:.1f} min training, "
                                      f"{world} process{'es' if world > 1 else ''})"))
    except ImageDecodeError:  # data.invalid=error met an image it cannot decode: keep what was trained
        if world == 1 and stop["saved_at"] != done:  # (under DDP the other ranks are not here to save with)
            save(done)
            log.error("saved a checkpoint at iteration %d before stopping on an undecodable image", done)
        raise
    finally:
        bar.close()
        if writer is not None:
            writer.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)
    return stats


def _describe_nonfinite(it: int, losses: dict, targets: list, dataset: CocoDetection, out: dict, run_dir: Path) -> str:
    """Name the iteration, every loss term and the batch's images; dump the batch for inspection."""
    values = {k: float(v.detach()) for k, v in losses.items()}
    ids = [t["image_id"] for t in targets]
    files = [dataset.coco.imgs[i]["file_name"] for i in ids]
    suffix = f"_rank{dist.rank()}" if dist.world_size() > 1 else ""
    dump = run_dir / f"nonfinite_iter{it + 1:07d}{suffix}.pt"
    sampled = out.get("sampled")
    torch.save({"iteration": it + 1, "losses": values, "image_ids": ids, "files": files,
                "targets": [{k: (v.cpu() if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets],
                "proposals": None if sampled is None else sampled.proposals.cpu(),
                "labels": None if sampled is None else sampled.labels.cpu(),
                "deltas": None if out.get("deltas") is None else out["deltas"].detach().cpu()}, dump)
    return (f"non-finite loss at iteration {it + 1}: " + ", ".join(f"{k}={v}" for k, v in values.items())
            + f"; image ids {ids}; files {files}; batch dumped to {dump}")

