"""Region proposal network: torchvision's ``RegionProposalNetwork`` with a pluggable box loss.

torchvision's RPN computes its losses only in training mode and hard-codes smooth L1 with
beta = 1/9. This subclass keeps all of torchvision's parts (anchor generator, head, matcher,
sampler, proposal filtering) and changes two things: losses are computed whenever targets are
given (so validation loss is possible), and the box loss is the configured ``BoxLoss``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers

from detlib.losses import BoxLoss


class RPN(RegionProposalNetwork):
    """``forward(images, features, targets=None) -> (proposals, losses)``.

    ``proposals``: per image ``(P, 4)`` xyxy in the resized image's pixels (detached).
    ``losses``: ``loss_rpn_cls`` and ``loss_rpn_box_reg`` when ``targets`` are given, else empty.
    """

    def __init__(self, *args, box_loss: BoxLoss, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if box_loss.needs_log_variance:  # torchvision's RPNHead predicts 4 deltas per anchor, no variance
            raise ValueError(f"rpn_loss: {type(box_loss).__name__} needs a predicted log-variance per coordinate, "
                             "which only the box head makes: use it as loss=NAME and another loss@rpn_loss")
        self.box_loss = box_loss

    def forward(  # type: ignore[override]
        self, images: ImageList, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[list[Tensor], dict[str, Tensor]]:
        feats = list(features.values())
        objectness, deltas = self.head(feats)
        # Boxes stay float32 under autocast: the anchor generator takes the feature maps' dtype and
        # BoxCoder.decode the deltas', and bf16 would put a box centre 2-4 px off at 512-2047 px.
        anchors = self.anchor_generator(images, [torch.empty(f.shape[-2:], device=f.device) for f in feats])
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        objectness, deltas = objectness.float(), deltas.float()
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes, _scores = self.filter_proposals(proposals, objectness, images.image_sizes, num_anchors_per_level)
        losses: dict[str, Tensor] = {}
        if targets is not None:
            labels, matched_gt = self.assign_targets_to_anchors(anchors, targets)
            losses = self.losses(objectness, deltas, labels, matched_gt, anchors)
        return boxes, losses

    def losses(
        self, objectness: Tensor, deltas: Tensor, labels: list[Tensor], matched_gt: list[Tensor], anchors: list[Tensor]
    ) -> dict[str, Tensor]:
        """Objectness BCE and box loss over the sampled anchors.

        Both are normalised by the number of sampled anchors (positives and negatives), as in
        torchvision and detectron2.
        """
        pos_masks, neg_masks = self.fg_bg_sampler(labels)
        pos = torch.where(torch.cat(pos_masks))[0]
        sampled = torch.where(torch.cat(pos_masks) | torch.cat(neg_masks))[0]
        labels_all = torch.cat(labels)
        num_sampled = max(sampled.numel(), 1)
        anchors_all, gt_all = torch.cat(anchors), torch.cat(matched_gt)
        loss_box = self.box_loss(deltas[pos], anchors_all[pos], gt_all[pos], self.box_coder)
        loss_cls = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled], labels_all[sampled], reduction="sum") / num_sampled
        return {"loss_rpn_cls": loss_cls, "loss_rpn_box_reg": loss_box / num_sampled}
