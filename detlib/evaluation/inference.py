"""Run a detector over a dataset: COCO-format detections and the validation losses, in one pass."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from detlib.data.coco import CocoDetection, collate
from detlib.evaluation.coco_eval import evaluate_coco, to_coco_results


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    batch_size: int = 16,
    with_losses: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[dict], dict[str, float]]:
    """Detections as COCO results (category ids, xywh) and the mean of each loss term over the set.

    Losses use the same sampling as training; the global RNG is forked so evaluating never changes
    the training run's random stream (resume stays bit-exact).
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    results: list[dict] = []
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for images, targets in loader:
            images = [im.to(device, non_blocking=True) for im in images]
            tgts = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
            with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                out = model(images, tgts if with_losses else None, detect=True)
            results += to_coco_results(out["detections"], [t["image_id"] for t in targets], dataset.label_to_cat)
            for k, v in out.get("losses", {}).items():
                sums[k] = sums.get(k, 0) + v.detach().float()
            batches += 1
    model.train(was_training)
    losses = {k: float(v) / max(batches, 1) for k, v in sums.items()}
    if losses:
        losses["loss"] = sum(losses.values())
    return results, losses


def evaluate(model: nn.Module, dataset: CocoDetection, device: torch.device, batch_size: int = 16,
             max_dets: tuple[int, ...] = (1, 10, 100), autocast_dtype: torch.dtype | None = None,
             backend: str = "pycocotools"):
    """``(stats, val_losses, results, cocoeval)`` of ``model`` on ``dataset``; ``backend``: see ``evaluate_coco``."""
    results, losses = predict(model, dataset, device, batch_size, autocast_dtype=autocast_dtype)
    stats, E = evaluate_coco(dataset.coco, results, max_dets, backend=backend)
    return stats, losses, results, E
