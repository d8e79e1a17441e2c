"""The Fast R-CNN RoI box head: RoIAlign -> MLP -> class scores and class-specific box deltas.

Written here rather than taken from torchvision because torchvision's ``RoIHeads`` hard-codes
smooth L1 with beta = 1/9. Prediction and loss are separate calls, so validation loss is free:

    logits, deltas = head(features, proposals, image_sizes)
    losses = head.losses(logits, deltas, sampled)          # needs targets
    detections = head.postprocess(logits, deltas, proposals, image_sizes)

Built from torchvision's parts: ``MultiScaleRoIAlign``, ``BoxCoder``, ``Matcher``,
``BalancedPositiveNegativeSampler``, ``box_iou``, ``batched_nms``.

A loss with ``needs_log_variance`` (``loss=kl``) makes the head also predict a log-variance per delta (He et
al. 2019), which inference may use for variance voting; with any other loss the head is the plain one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import MultiScaleRoIAlign, batched_nms, box_iou, clip_boxes_to_image, remove_small_boxes

from detlib.losses import BoxLoss
from detlib.modeling.diagnostics import regression_diagnostics


@dataclass
class Sampled:
    """RoIs sampled for the loss, concatenated over the batch (R = sum of per-image samples).

    ``proposals (R, 4)`` xyxy; ``labels (R,)`` int64, 0 = background; ``gt_boxes (R, 4)`` xyxy of
    each RoI's matched ground truth (meaningless where ``labels == 0``); ``per_image``: list of
    per-image proposal tensors, for RoIAlign.
    """

    proposals: Tensor
    labels: Tensor
    gt_boxes: Tensor
    per_image: list[Tensor]


class MLPHead(nn.Module):
    """Two fully connected layers on flattened RoI features (torchvision's ``TwoMLPHead``)."""

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class RoIBoxHead(nn.Module):
    def __init__(
        self,
        roi_align: MultiScaleRoIAlign,
        in_channels: int,
        num_classes: int,
        box_loss: BoxLoss,
        hidden: int = 256,
        box_coder_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.5,
        batch_size_per_image: int = 512,
        positive_fraction: float = 0.25,
        score_thresh: float = 0.05,
        nms_thresh: float = 0.5,
        detections_per_img: int = 100,
        target_outliers: float = 0.0,
        variance_voting: bool = False,
        voting_sigma_t: float = 0.02,
    ) -> None:
        super().__init__()
        self.roi_align = roi_align
        res = roi_align.output_size[0] * roi_align.output_size[1]
        self.mlp = MLPHead(in_channels * res, hidden)
        self.cls_score = nn.Linear(hidden, num_classes)
        self.bbox_pred = nn.Linear(hidden, num_classes * 4)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)
        self.num_classes = num_classes
        self.box_loss = box_loss
        # (10, 10, 5, 5): Fast R-CNN's target scaling, so deltas have roughly unit variance.
        # The clamp log(1000/16) (BoxCoder's default) stops exp() overflow when decoding dw, dh.
        self.box_coder = BoxCoder(tuple(box_coder_weights), bbox_xform_clip=math.log(1000.0 / 16))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        if not 0 <= target_outliers <= 1:
            raise ValueError(f"target_outliers must be in [0, 1], got {target_outliers!r}")
        self.target_outliers = target_outliers  # a study knob: see corrupt_targets
        # alpha = log sigma^2 per class and delta, for a loss that takes it (KLLoss); created last and only
        # then, so every other loss keeps the plain head's parameters and random draws. Weights N(0, 1e-4) and
        # bias 0 as in He et al. 2019: sigma^2 starts at ~1, where the KL loss is smooth L1 with beta 1.
        self.bbox_log_var: nn.Linear | None = None
        if box_loss.needs_log_variance:
            self.bbox_log_var = nn.Linear(hidden, num_classes * 4)
            nn.init.normal_(self.bbox_log_var.weight, std=1e-4)
            nn.init.zeros_(self.bbox_log_var.bias)
        self.box_dim = 8 if box_loss.needs_log_variance else 4  # per class: deltas (+ log-variances)
        if variance_voting and not box_loss.needs_log_variance:
            raise ValueError("variance_voting needs a loss that predicts a log-variance per coordinate (loss=kl), "
                             f"got {type(box_loss).__name__}")
        if not voting_sigma_t > 0:
            raise ValueError(f"voting_sigma_t must be > 0, got {voting_sigma_t!r}")
        self.variance_voting, self.voting_sigma_t = variance_voting, voting_sigma_t

    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> Sampled:
        """Add ground truth to the proposals, match by IoU, sample fg/bg RoIs per image."""
        props, labels, gts = [], [], []
        for p, t in zip(proposals, targets):
            gt, gt_labels = t["boxes"], t["labels"]
            p = torch.cat([p, gt.to(p.dtype)])
            if gt.numel() == 0:
                matched = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
                lab = torch.zeros_like(matched)
                gt = torch.zeros((1, 4), dtype=p.dtype, device=p.device)
            else:
                idx = self.matcher(box_iou(gt, p))
                matched = idx.clamp(min=0)
                lab = gt_labels[matched].clone()
                lab[idx == Matcher.BELOW_LOW_THRESHOLD] = 0
                lab[idx == Matcher.BETWEEN_THRESHOLDS] = -1  # ignored
            pos, neg = self.sampler([lab])
            keep = torch.where(pos[0] | neg[0])[0]
            props.append(p[keep])
            labels.append(lab[keep].clamp(min=0))
            gts.append(gt[matched[keep]])
        return Sampled(torch.cat(props), torch.cat(labels), torch.cat(gts), props)

    def forward(
        self, features: dict[str, Tensor], proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """RoI features -> ``logits (R, K)`` and ``deltas (R, K * 4)``, R = all proposals of the batch; with a
        log-variance head ``(R, K * 8)``: per class the 4 deltas, then their 4 log-variances."""
        x = self.mlp(self.roi_align(features, proposals, image_sizes))
        logits, deltas = self.cls_score(x), self.bbox_pred(x)
        if self.bbox_log_var is None:
            return logits, deltas
        n = x.shape[0]
        return logits, torch.cat([deltas.view(n, -1, 4), self.bbox_log_var(x).view(n, -1, 4)], -1).view(n, -1)

    def fg_predictions(self, deltas: Tensor, sampled: Sampled) -> tuple[Tensor, Tensor, Tensor]:
        """For foreground RoIs: predicted deltas of their ground-truth class (float32; ``(F, 8)`` with the
        log-variances), proposals and GT boxes."""
        fg = torch.where(sampled.labels > 0)[0]
        pred = deltas.view(deltas.shape[0], -1, self.box_dim)[fg, sampled.labels[fg]].float()
        return pred, sampled.proposals[fg], sampled.gt_boxes[fg]

    @torch.no_grad()
    def diagnostics(self, deltas: Tensor, sampled: Sampled, full: bool = False) -> dict[str, Tensor]:
        """Detached facts about this step's sampled RoIs: always ``dump/{proposals,labels,deltas}`` (what a
        non-finite dump needs, no compute); with ``full``, also ``regression_diagnostics`` (shadow losses,
        foreground IoU, residuals)."""
        out = {"dump/proposals": sampled.proposals.detach(), "dump/labels": sampled.labels.detach(),
               "dump/deltas": deltas.detach()}
        if full:
            pred, props, gt = self.fg_predictions(deltas.detach(), sampled)
            out |= regression_diagnostics(pred[:, :4], props, gt, self.box_coder)
            if self.box_dim == 8:  # the predicted log sigma^2 of the foreground deltas
                out["train/box_log_var"] = pred[:, 4:].sum() / max(pred[:, 4:].numel(), 1)
                out["train/box_log_var_hist"] = pred[:, 4:].flatten()
        return out

    def losses(self, logits: Tensor, deltas: Tensor, sampled: Sampled) -> dict[str, Tensor]:
        """``loss_cls`` (cross-entropy) and ``loss_box_reg`` over the sampled RoIs.

        The regression loss covers foreground RoIs only, on their ground-truth class's deltas, and
        is divided by the number of *all* sampled RoIs (Fast R-CNN, torchvision, detectron2), which
        gives each foreground example equal influence whatever the batch's fg fraction.
        """
        num_sampled = max(sampled.labels.numel(), 1)
        loss_cls = F.cross_entropy(logits.float(), sampled.labels, reduction="sum") / num_sampled
        pred, props, gt = self.fg_predictions(deltas, sampled)
        if self.training and self.target_outliers > 0:  # the regression target only: matching is done
            gt = corrupt_targets(gt, self.target_outliers)
        loss_box = self.box_loss(pred, props, gt, self.box_coder)
        return {"loss_cls": loss_cls, "loss_box_reg": loss_box / num_sampled}

    @torch.no_grad()
    def postprocess(
        self, logits: Tensor, deltas: Tensor, proposals: list[Tensor], image_sizes: list[tuple[int, int]]
    ) -> list[dict[str, Tensor]]:
        """Per image: ``boxes (D, 4)`` xyxy, ``scores (D,)``, ``labels (D,)`` in 1..K-1, after class-wise NMS
        (and, with ``variance_voting``, each kept box voted by its neighbours: ``variance_voting``)."""
        counts = [p.shape[0] for p in proposals]
        deltas, log_var = deltas.float(), None
        if self.box_dim == 8:
            split = deltas.view(deltas.shape[0], -1, 8)
            deltas, log_var = split[..., :4].reshape(deltas.shape[0], -1), split[..., 4:]
        boxes_all = self.box_coder.decode(deltas, proposals)  # (R, K, 4)
        scores_all = F.softmax(logits.float(), -1)
        variances = ([self.vote_variances(v, p) for v, p in zip(log_var.split(counts), proposals)]
                     if self.variance_voting else [None] * len(counts))
        results = []
        for boxes, scores, size, var in zip(boxes_all.split(counts), scores_all.split(counts), image_sizes, variances):
            boxes = clip_boxes_to_image(boxes, size)[:, 1:]  # drop background
            labels = torch.arange(1, self.num_classes, device=boxes.device).expand(scores.shape[0], -1)
            boxes, scores, labels = boxes.reshape(-1, 4), scores[:, 1:].reshape(-1), labels.reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            var = None if var is None else var[keep]
            keep = remove_small_boxes(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            var = None if var is None else var[keep]
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            kept = boxes[keep]
            if var is not None:
                kept = variance_voting(kept, labels[keep], boxes, labels, var, self.voting_sigma_t)
            results.append({"boxes": kept, "scores": scores[keep], "labels": labels[keep]})
        return results

    def vote_variances(self, log_var: Tensor, proposals: Tensor) -> Tensor:
        """``(P * (K-1), 4)``: the variances of ``(cx, cy, log w, log h)`` of each foreground-class box of one
        image, from the predicted ``log_var (P, K, 4)`` of its deltas and its ``proposals (P, 4)``: decoding is
        linear in each delta (``cx = px + pw dx / wx``, ``log w = log pw + dw / ww``), so the variances scale
        exactly: ``(pw / wx)^2 sigma_dx^2``, ..., ``sigma_dw^2 / ww^2``. The exponent is clamped to +-50 so that
        ``exp`` and ``1 / var`` stay finite in float32."""
        wx, wy, ww, wh = self.box_coder.weights
        size = (proposals[:, 2:] - proposals[:, :2]).float()  # (P, 2): pw, ph
        scale = torch.cat([size / size.new_tensor([wx, wy]), size.new_tensor([1 / ww, 1 / wh]).expand_as(size)], 1)
        var = torch.exp(log_var[:, 1:].clamp(-50, 50)) * scale[:, None] ** 2  # drop background, as the boxes
        return var.reshape(-1, 4)


def corrupt_targets(gt: Tensor, p: float) -> Tensor:
    """``gt (F, 4)`` xyxy with each box, with probability ``p``, replaced by a gross error: shifted by 1-2 box
    sizes along x, y or both, or scaled x3 or /3 about its centre (IoU with the original 0 or 1/9), as
    ``data.noise.outliers`` corrupts annotations. Drawn from torch's global RNG, which checkpoints save."""
    n = gt.shape[0]
    if n == 0:
        return gt
    hit = torch.rand(n, device=gt.device) < p
    kind = torch.randint(3, (n,), device=gt.device)  # 0 shift, 1 grow, 2 shrink
    axes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], device=gt.device)[torch.randint(3, (n,), device=gt.device)]
    sign = torch.randint(2, (n, 2), device=gt.device) * 2 - 1
    wh, centre = gt[:, 2:] - gt[:, :2], (gt[:, :2] + gt[:, 2:]) / 2
    shift = axes * sign * (1 + torch.rand(n, 2, device=gt.device)) * wh
    scale = torch.where(kind == 1, 3.0, 1 / 3).to(gt.dtype)[:, None]
    scaled = torch.cat([centre - scale * wh / 2, centre + scale * wh / 2], 1)
    bad = torch.where((kind == 0)[:, None], gt + shift.repeat(1, 2), scaled)
    return torch.where(hit[:, None], bad, gt)


def variance_voting(boxes: Tensor, labels: Tensor, cand_boxes: Tensor, cand_labels: Tensor, cand_var: Tensor,
                    sigma_t: float = 0.02) -> Tensor:
    """Variance voting (He et al., CVPR 2019, Algorithm 1): each kept box becomes, coordinate by coordinate, the
    mean of the candidate boxes of its class that overlap it, weighted by ``p_i / sigma_i^2``,
    ``p_i = exp(-(1 - IoU(b_i, b))^2 / sigma_t)`` (itself included, p = 1; sigma_t 0.02 in the paper).

    ``boxes (D, 4)`` xyxy, the boxes NMS kept, ``labels (D,)``; ``cand_* (M, ...)``: every box NMS chose
    from (the kept ones among them), ``cand_var (M, 4)`` the variances of its ``(cx, cy, log w, log h)``
    (``RoIBoxHead.vote_variances``). The paper votes on the corners; detlib's head predicts the variances of
    centre offsets and log sizes, so the vote is in those coordinates, where they hold exactly. Scores
    are unchanged. Returns ``(D, 4)`` xyxy.
    """
    if boxes.shape[0] == 0:
        return boxes
    iou = box_iou(boxes, cand_boxes) * (labels[:, None] == cand_labels[None])
    p = torch.exp(-((1 - iou) ** 2) / sigma_t) * (iou > 0)
    weight = p[..., None] / cand_var[None]  # (D, M, 4)
    wh = cand_boxes[:, 2:] - cand_boxes[:, :2]
    code = torch.cat([(cand_boxes[:, :2] + cand_boxes[:, 2:]) / 2, wh.log()], 1)  # (M, 4): cx, cy, log w, log h
    voted = (weight * code).sum(1) / weight.sum(1)
    centre, size = voted[:, :2], voted[:, 2:].exp()
    return torch.cat([centre - size / 2, centre + size / 2], 1)

