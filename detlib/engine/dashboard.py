"""TensorBoard dashboards beyond scalars: written at evaluation time only, so event files stay small.

* ``log_eval``: per-class AP (a text table and ``val/AP/<class>`` scalars), per-class precision-recall
  curves at IoU 0.5 and 0.75 from COCOeval's precision array (a figure, and at IoU 0.5 as the PR-curve
  plugin's ``val/pr/<class>``), and a few fixed val images with ground truth (green, with its class) and
  predictions (red);
* ``grad_norms``: the whole model's gradient norm and the groups it names (read at log steps only);
* ``log_hparams``: the run's loss, its parameters and the training set-up against the final metrics, as a
  TensorBoard run of its own (``tb/hparams``).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402
from torch.utils.tensorboard.summary import hparams as hparams_summary  # noqa: E402
from torchvision.utils import draw_bounding_boxes, make_grid  # noqa: E402

from detlib.data.coco import CocoDetection  # noqa: E402
from detlib.evaluation.coco_eval import iou_index, per_class_ap  # noqa: E402
from detlib.evaluation.report import category_names  # noqa: E402
from detlib.runs import HPARAMS_RUN  # noqa: E402

NUM_IMAGES = 4  # val images drawn at every evaluation (always the same ones)
TILE = 256  # longest side of each drawn image, in pixels


def log_eval(writer: SummaryWriter, step: int, E: COCOeval, val_set: CocoDetection, model: nn.Module,
             device: torch.device, score_thresh: float = 0.5) -> None:
    names = category_names(val_set.coco)
    per_class = per_class_ap(E, names)
    rows = ["| class | AP |", "|---|---|"] + [
        f"| {n} | {'n/a' if v is None else f'{v:.4f}'} |" for n, v in per_class.items()]
    writer.add_text("val/per_class_AP", "\n".join(rows), step)
    for n, v in per_class.items():
        if v is not None:
            writer.add_scalar(f"val/AP/{n}", v, step)
    writer.add_figure("val/pr_curves", pr_figure(E, names), step)
    log_pr_curves(writer, step, E, names)
    writer.add_image("val/detections", detections_grid(model, val_set, device, score_thresh), step)


def pr_figure(E: COCOeval, names: dict[int, str]):
    """Precision against recall per class at IoU 0.5 and 0.75 (area all, largest maxDets)."""
    prec = E.eval["precision"]  # (T, R, K, A, M)
    recall = np.asarray(E.params.recThrs, dtype=np.float64)
    fig, axes = plt.subplots(1, 2, figsize=(9, 4), sharey=True)
    for ax, thr in zip(axes, (0.5, 0.75)):
        t = iou_index(E, thr)
        for k, cat in enumerate(E.params.catIds):
            p = prec[t, :, k, 0, -1]
            if (p > -1).any():
                ax.plot(recall, p.clip(min=0), label=names.get(cat, str(cat)))
        ax.set(title=f"IoU {thr:.2f}", xlabel="recall", xlim=(0, 1), ylim=(0, 1.02))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("precision")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)  # beside the axes, not on a curve
    fig.tight_layout()
    return fig


def log_pr_curves(writer: SummaryWriter, step: int, E: COCOeval, names: dict[int, str], iou: float = 0.5) -> None:
    """Per class, COCOeval's precision at its 101 recall points (IoU ``iou``, area all, largest maxDets) as
    TensorBoard's own PR-curve plugin data (``val/pr/<class>``): interactive, steps comparable with a slider. The
    plugin's count fields are not defined for COCO's interpolated curve and are written as zeros."""
    t = iou_index(E, iou)
    recall = np.asarray(E.params.recThrs, dtype=np.float64)
    zeros = np.zeros_like(recall)
    for k, cat in enumerate(E.params.catIds):
        precision = E.eval["precision"][t, :, k, 0, -1]
        if (precision > -1).any():
            writer.add_pr_curve_raw(f"val/pr/{names.get(cat, str(cat))}", zeros, zeros, zeros, zeros,
                                    precision.clip(min=0)[::-1].copy(), recall[::-1].copy(), step,
                                    num_thresholds=len(recall))


@torch.no_grad()
def detections_grid(model: nn.Module, val_set: CocoDetection, device: torch.device, score_thresh: float) -> torch.Tensor:
    """``(3, H, W)`` uint8: the first val images with GT (green) and predictions above ``score_thresh`` (red)."""
    was_training = model.training
    model.eval()
    samples = [val_set[i] for i in range(min(NUM_IMAGES, len(val_set)))]
    targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for _, t in samples]
    out = model([im.to(device) for im, _ in samples], targets, detect=True)["detections"]  # Fast R-CNN needs them
    model.train(was_training)
    tiles = []
    for (image, target), det in zip(samples, out):
        scale = TILE / max(image.shape[1:])  # small images drawn larger so labels stay legible, big ones smaller
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale)))
        canvas = F.interpolate(image[None] * 255, size=size, mode="bilinear")[0].clamp(0, 255).to(torch.uint8)
        gt_labels = [val_set.class_names[int(lab) - 1] for lab in target["labels"].tolist()]
        if len(gt_labels):  # torchvision warns on every empty call
            canvas = draw_bounding_boxes(canvas, target["boxes"] * scale, labels=gt_labels, colors="lime", width=2)
        keep = det["scores"] > score_thresh
        labels = [f"{val_set.class_names[int(lab) - 1]} {s:.2f}" for lab, s in
                  zip(det["labels"][keep].tolist(), det["scores"][keep].tolist())]
        if labels:
            canvas = draw_bounding_boxes(canvas, det["boxes"][keep].cpu() * scale, labels=labels, colors="red", width=1)
        tiles.append(canvas)
    h, w = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    tiles = [F.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])) for t in tiles]  # mixed sizes and orientations
    return make_grid(tiles, nrow=len(tiles), padding=2)


@torch.no_grad()
def grad_norms(model: nn.Module) -> dict[str, float]:
    """L2 norms of the current gradients: the whole model's and each group the model names in
    ``grad_norm_groups()`` (e.g. ``box_head``). Read after the optimizer step: with fp16, ``GradScaler.step``
    has unscaled them in place by then, so these are the true gradients' norms."""

    def norm(params) -> torch.Tensor:
        gs = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return torch.stack(gs).norm() if gs else torch.zeros(())

    groups = model.grad_norm_groups() if hasattr(model, "grad_norm_groups") else {}
    return {f"train/grad_norm/{k}": float(norm(v)) for k, v in groups.items()} | {
        "train/grad_norm/total": float(norm(model.parameters()))}


def log_hparams(writer: SummaryWriter, hparams: dict, stats: dict, step: int) -> None:
    """One HParams row per run, so runs under one log folder compare in TensorBoard's HParams table.

    TensorBoard takes the table's columns from an experiment summary if any run wrote one (the first run it
    finds: the others' columns are missing), else from every run's session-start summary together, marking a
    column as differing when its values differ between the runs; it ticks the first five of (differing first,
    then by name). So no experiment summary is written: every run writes its session start and end, with all of
    its parameters (``run_record.hparams``, so a key that one run overrode has a value in every row and
    differs where it does). TensorBoard's metrics are then every scalar of the session's TensorBoard run and
    of those under it, so the row is a run of its own, ``tb/hparams`` (``runs.HPARAMS_RUN``), holding the final
    evaluation's ``val/<stat>`` (one point each, on the curves' last one): the table's metrics. A run finished
    again (resumed after its end) replaces its row."""
    clean = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hparams.items()}
    metrics = {f"val/{k}": (float("nan") if v is None else v) for k, v in stats.items()}
    _, start, end = hparams_summary(clean, metrics)
    folder = Path(writer.log_dir) / HPARAMS_RUN
    for old in folder.glob("events.out.tfevents.*"):
        old.unlink()
    with SummaryWriter(str(folder)) as row:
        row.file_writer.add_summary(start, step)
        for k, v in metrics.items():
            row.add_scalar(k, v, step)
        row.file_writer.add_summary(end, step)
