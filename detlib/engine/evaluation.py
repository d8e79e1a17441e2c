"""Evaluation during and after training: score the val set, write TensorBoard, ``eval_detail.json`` and the
scored detections (``detections.json``, so a run's AP can be bootstrapped over val images afterwards).

Every rank evaluates its shard (``inference.evaluate``); rank 0 writes. The metrics are COCO box AP
plus whatever the dataset asks for (``detlib.evaluation.evaluators``).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from detlib import distributed as dist
from detlib.config import EvalConfig
from detlib.data.coco import CocoDetection
from detlib.engine import dashboard
from detlib.evaluation import backends
from detlib.evaluation.evaluators import extra_metrics
from detlib.evaluation.inference import evaluate
from detlib.evaluation.report import category_names, write_eval_detail
from detlib.jsonio import append_jsonl, write_json
from detlib.runs import DETECTIONS, EVAL_DETAIL, METRICS_JSONL

log = logging.getLogger(__name__)


def evaluate_and_log(
    model: nn.Module, val_set: CocoDetection, device: torch.device, eval_cfg: EvalConfig,
    amp_dtype: torch.dtype | None, iteration: int, writer: SummaryWriter | None, run_dir: Path,
    eval_settings: dict, histograms: dict[str, Tensor] | None = None, weights: str = "model",
) -> dict[str, float | None]:
    """The 12 COCO stats (on every rank); on rank 0 also TensorBoard scalars, figures, ``histograms`` (the
    last logged training step's diagnostics), ``run_dir/eval_detail.json`` and ``run_dir/detections.json``. ``weights``: which weights
    ``model`` holds (``model``, or ``ema``: their moving average), recorded in ``eval_detail.json``."""
    t0 = time.perf_counter()
    backend = backends.resolve(str(eval_cfg.backend))  # auto: the fastest installed; recorded in eval_settings
    log.info("evaluating %d val images at iteration %d%s with %s", len(val_set), iteration,
             " (EMA weights)" if weights == "ema" else "", backends.label(backend))
    stats, val_losses, results, E = evaluate(
        model, val_set, device, eval_cfg.batch_size, tuple(eval_cfg.max_dets), amp_dtype, backend)
    if not dist.is_main():
        return stats
    extra = {}
    for key, tag, fn in extra_metrics(val_set):  # results are the gathered ones on rank 0
        extra[key] = fn(results, val_set.coco)
        writer.add_scalar(tag, float("nan") if extra[key]["mAP"] is None else extra[key]["mAP"], iteration)
    for k, v in (stats | val_losses).items():
        writer.add_scalar(f"val/{k}", float("nan") if v is None else v, iteration)
    append_jsonl(run_dir / METRICS_JSONL, {"iteration": iteration, "time": time.time()}
                 | {f"val/{k}": v for k, v in (stats | val_losses).items()})
    dashboard.log_eval(writer, iteration, E, val_set, model, device)
    for k, v in (histograms or {}).items():
        writer.add_histogram(k, v.cpu(), iteration)
    writer.flush()
    write_json(run_dir / DETECTIONS, results, indent=None)  # before eval_detail: a detail always has its dets
    detail = write_eval_detail(run_dir / EVAL_DETAIL, iteration, stats, E, category_names(val_set.coco),
                               val_losses, eval_settings | {"eval.backend": backend}, weights=weights, **extra)
    for k, v in ((detail["tide"] or {}).get("dAP") or {}).items():
        writer.add_scalar(f"val/tide/dAP_{k}", v, iteration)
    if detail["tp_iou"]:
        writer.add_scalar("val/tp_iou_mean", detail["tp_iou"]["mean"], iteration)
    writer.flush()
    per_class = detail["per_class_ap"]
    log.info("AP per class @ %d: %s", iteration,
             ", ".join(f"{n} {'n/a' if v is None else f'{v:.4f}'}" for n, v in per_class.items()))
    log.info("eval @ %d (%.1fs): AP %.4f AP50 %.4f AP75 %.4f  val loss %.4f", iteration, time.perf_counter() - t0,
             stats["AP"] or 0, stats["AP50"] or 0, stats["AP75"] or 0, val_losses.get("loss", float("nan")))
    return stats
