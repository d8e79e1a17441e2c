"""Run a detector over a dataset: COCO-format detections and the validation losses, in one pass.

Under DDP each rank runs every ``world_size``-th batch of the single-process batching (so every
image sees exactly the batch it would alone), the detections are gathered to rank 0, de-duplicated
by image id and evaluated there, and the stats are broadcast back: AP equals the single-process AP.

The results are in one deterministic order, the single-process one (images in ``dataset.ids`` order,
each image's detections as the model returned them), also under DDP: pycocotools breaks tied scores
by input order, so that order is what is scored and what ``tools/evaluate.py --run`` writes as its
detections file; pycocotools on that file gives the same numbers.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from detlib import distributed as dist
from detlib.data.coco import CocoDetection, collate
from detlib.device import autocast, to_device
from detlib.evaluation.coco_eval import evaluate_coco, to_coco_results


def shard_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[list[int]]:
    """This rank's share of the batches ``[0..B), [B..2B), ...`` of ``n`` images: every ``world_size``-th one."""
    return [list(range(s, min(s + batch_size, n))) for s in range(rank * batch_size, n, batch_size * world_size)]


@torch.no_grad()
def predict(
    model: nn.Module,
    dataset: CocoDetection,
    device: torch.device,
    batch_size: int = 16,
    with_losses: bool = True,
    autocast_dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[list[dict], dict[str, float]]:
    """Detections as COCO results (category ids, xywh) and the mean of each loss term over the set
    (over this rank's batches, see ``shard_batches``).

    Losses use the same sampling as training; the global RNG is forked so evaluating never changes
    the training run's random stream (resume stays bit-exact).
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_sampler=shard_batches(len(dataset), batch_size, rank, world_size),
                        collate_fn=collate)
    results: list[dict] = []
    sums: dict[str, torch.Tensor] = {}
    batches = 0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for images, targets in tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=None if rank == 0 else True):
            images, tgts = to_device(device, images, targets)
            with autocast(device, autocast_dtype):
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
             backend: str = "auto"):
    """``(stats, val_losses, results, cocoeval)`` of ``model`` on ``dataset``; ``backend``: see ``evaluate_coco``."""
    rank, world = dist.rank(), dist.world_size()
    results, losses = predict(model, dataset, device, batch_size, autocast_dtype=autocast_dtype, rank=rank,
                              world_size=world)
    if world > 1:
        parts = dist.gather_objects((results, losses, len(shard_batches(len(dataset), batch_size, rank, world))))
        results, seen = [], set()
        for part, _, _ in parts:
            ids = {r["image_id"] for r in part} - seen  # an image evaluated twice counts once
            results += [r for r in part if r["image_id"] in ids]
            seen |= ids
        position = {img: i for i, img in enumerate(dataset.ids)}
        results.sort(key=lambda r: position.get(r["image_id"], -1))  # the single-process order (stable)
        total = sum(n for _, _, n in parts)
        losses = {k: sum(p[1][k] * p[2] for p in parts if k in p[1]) / max(total, 1) for k in parts[0][1]}
    stats, E = evaluate_coco(dataset.coco, results, max_dets, backend=backend) if dist.is_main() else (None, None)
    stats = dist.broadcast_object(stats)
    return stats, losses, results, E
