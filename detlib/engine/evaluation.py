"""Evaluation during and after training: score the val set, write its scalars through the run's writers,
TensorBoard's dashboards, ``eval_detail.json`` and the scored detections (``detections.json``, so a run's AP
can be bootstrapped over val images afterwards).

Every rank evaluates its shard (``inference.evaluate``); rank 0 writes. The metrics are COCO box AP
plus those ``eval.metrics`` names (``detlib.evaluation.evaluators``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from detlib import distributed as dist
from detlib.config import EvalConfig
from detlib.data.coco import CocoDetection
from detlib.engine import dashboard
from detlib.engine.writers import Writers
from detlib.evaluation import backends
from detlib.evaluation.evaluators import compute, extra_metrics
from detlib.evaluation.inference import evaluate
from detlib.evaluation.report import category_names, write_eval_detail
from detlib.jsonio import write_json
from detlib.runs import DETECTIONS, EVAL_DETAIL

log = logging.getLogger(__name__)


@dataclass
class Evaluation:
    """What every evaluation of one run shares: the val set and how to run the model on it, and where the
    results go (``run_dir``; ``writers``: rank 0's, none on the other ranks)."""

    val_set: CocoDetection
    cfg: EvalConfig
    device: torch.device
    run_dir: Path
    amp_dtype: torch.dtype | None = None  # the run's autocast (trainer.amp)
    writers: Writers = field(default_factory=Writers)
    settings: dict = field(default_factory=dict)  # the run's inference-only settings, recorded in eval_detail.json
    weights: str = "model"  # which weights are scored: model, or ema (their moving average); recorded too


def evaluate_and_log(ev: Evaluation, model: nn.Module, iteration: int,
                     histograms: dict[str, Tensor] | None = None) -> dict[str, float | None]:
    """The 12 COCO stats of ``model`` (holding ``ev.weights``) at ``iteration``, on every rank; on rank 0 also
    the ``val/*`` scalars (to the writers), TensorBoard's figures and ``histograms`` (the last logged training
    step's diagnostics), ``run_dir/eval_detail.json`` and ``run_dir/detections.json``."""
    t0, val_set = time.perf_counter(), ev.val_set
    backend = backends.resolve(str(ev.cfg.backend))  # auto: the fastest installed; recorded in eval_detail.json
    log.info("evaluating %d val images at iteration %d%s with %s", len(val_set), iteration,
             " (EMA weights)" if ev.weights == "ema" else "", backends.label(backend))
    stats, val_losses, results, E = evaluate(
        model, val_set, ev.device, ev.cfg.batch_size, tuple(ev.cfg.max_dets), ev.amp_dtype, backend)
    if not dist.is_main():
        return stats
    metrics = extra_metrics(ev.cfg.metrics)
    extra = compute(metrics, results, val_set.coco)  # results are the gathered ones on rank 0
    scalars = {m.tag: extra[m.key]["mAP"] for m in metrics} | {f"val/{k}": v for k, v in (stats | val_losses).items()}
    tb = ev.writers.tensorboard  # what only TensorBoard shows
    if tb is not None:
        dashboard.log_eval(tb, iteration, E, val_set, model, ev.device)
        for k, v in (histograms or {}).items():
            tb.add_histogram(k, v.cpu(), iteration)
    write_json(ev.run_dir / DETECTIONS, results, indent=None)  # before eval_detail: a detail always has its dets
    detail = write_eval_detail(ev.run_dir / EVAL_DETAIL, iteration, stats, E, category_names(val_set.coco),
                               val_losses, ev.settings | {"eval.backend": backend}, weights=ev.weights,
                               **extra)
    for k, v in ((detail["tide"] or {}).get("dAP") or {}).items():
        scalars[f"val/tide/dAP_{k}"] = v
    if detail["tp_iou"]:
        scalars["val/tp_iou_mean"] = detail["tp_iou"]["mean"]
    ev.writers.write(iteration, scalars)
    if tb is not None:
        tb.flush()  # shown at once, not at the writer's next periodic flush
    per_class = detail["per_class_ap"]
    log.info("AP per class @ %d: %s", iteration,
             ", ".join(f"{n} {'n/a' if v is None else f'{v:.4f}'}" for n, v in per_class.items()))
    log.info("eval @ %d (%.1fs): AP %.4f AP50 %.4f AP75 %.4f  val loss %.4f", iteration, time.perf_counter() - t0,
             stats["AP"] or 0, stats["AP50"] or 0, stats["AP75"] or 0, val_losses.get("loss", float("nan")))
    return stats
