"""Faster R-CNN: transform -> backbone -> RPN -> RoI box head, composed from parts passed in.

``model(images, targets)`` always returns the same thing, a dict with
``"losses"`` (when targets are given, in train *and* eval mode, so validation loss is free) and
``"detections"`` (when ``detect=True``; by default in eval mode), so no caller has to guess.

Fast R-CNN mode (``model=fast_rcnn``): a proposal source (``detlib.modeling.proposals``) replaces
the RPN; the losses then simply have no ``loss_rpn_*`` terms.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign

from detlib.losses import BoxLoss, SmoothL1
from detlib.modeling.box_head import RoIBoxHead
from detlib.modeling.rpn import RPN


class FasterRCNN(nn.Module):
    """``rpn`` or ``proposals`` (a source called on the transformed targets), exactly one of them."""

    def __init__(
        self, transform: GeneralizedRCNNTransform, backbone: nn.Module, rpn: RPN | None, roi_head: RoIBoxHead,
        proposals: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if (rpn is None) == (proposals is None):
            raise ValueError("FasterRCNN needs exactly one of an RPN and a proposal source")
        self.transform, self.backbone, self.rpn, self.roi_head = transform, backbone, rpn, roi_head
        self.proposals = proposals

    def grad_norm_groups(self) -> dict[str, list[nn.Parameter]]:
        """Parameter groups whose gradient norms the trainer logs (beside the total)."""
        return {"box_head": list(self.roi_head.parameters())}

    @property
    def min_size(self) -> tuple[int, ...]:
        """Training sizes of the shorter side (one is drawn per image); evaluation uses the last."""
        return tuple(self.transform.min_size)

    @property
    def max_size(self) -> int:
        """Cap on the longer side after resizing."""
        return self.transform.max_size

    def forward(
        self, images: list[Tensor], targets: list[dict] | None = None, detect: bool | None = None,
        diagnostics: bool = False,
    ) -> dict:
        """``images``: list of ``(3, H, W)`` float in [0, 1]; ``targets``: per image ``boxes (N, 4)``
        xyxy pixels and ``labels (N,)`` int64 in 1..K-1.

        Returns ``{"losses": {name: scalar}, "diagnostics": {tag: detached tensor}, "detections": [per
        image boxes/scores/labels in the input image's pixels]}``; missing keys were not asked for.
        ``diagnostics``: also compute the box head's shadow losses, IoU and residuals (see
        ``RoIBoxHead.diagnostics``); the cheap ``dump/*`` entries come with every loss computation.
        """
        detect = (not self.training) if detect is None else detect
        original_sizes = [tuple(im.shape[-2:]) for im in images]
        image_list, targets = self.transform(images, targets)
        features = self.backbone(image_list.tensors)
        if self.rpn is not None:
            proposals, losses = self.rpn(image_list, features, targets)
        elif targets is None:
            raise ValueError("Fast R-CNN mode takes its proposals by image id: pass targets (at least image_id)")
        else:
            proposals, losses = self.proposals(targets, original_sizes, image_list.image_sizes), {}
        out: dict = {}
        if targets is not None:
            sampled = self.roi_head.sample(proposals, targets)
            logits, deltas = self.roi_head(features, sampled.per_image, image_list.image_sizes)
            losses.update(self.roi_head.losses(logits, deltas, sampled))
            out.update(losses=losses, diagnostics=self.roi_head.diagnostics(deltas, sampled, full=diagnostics))
        if detect:
            logits, deltas = self.roi_head(features, proposals, image_list.image_sizes)
            dets = self.roi_head.postprocess(logits, deltas, proposals, image_list.image_sizes)
            out["detections"] = self.transform.postprocess(dets, image_list.image_sizes, original_sizes)
        return out


def build_faster_rcnn(
    backbone: nn.Module,
    num_classes: int,
    box_loss: BoxLoss,
    rpn_box_loss: BoxLoss | None = None,
    min_size: int | Sequence[int] = 128,
    max_size: int = 128,
    image_mean: Sequence[float] = (0.485, 0.456, 0.406),
    image_std: Sequence[float] = (0.229, 0.224, 0.225),
    anchor_sizes: Sequence[Sequence[int]] = ((16,), (32,), (64,)),
    aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0),
    rpn_pre_nms_top_n_train: int = 1000,
    rpn_pre_nms_top_n_test: int = 500,
    rpn_post_nms_top_n_train: int = 300,
    rpn_post_nms_top_n_test: int = 150,
    rpn_nms_thresh: float = 0.7,
    rpn_fg_iou_thresh: float = 0.7,
    rpn_bg_iou_thresh: float = 0.3,
    rpn_batch_size_per_image: int = 256,
    rpn_positive_fraction: float = 0.5,
    roi_featmap_names: Sequence[str] = ("0", "1", "2"),
    roi_output_size: int = 7,
    roi_sampling_ratio: int = 2,
    roi_canonical_scale: int = 224,
    roi_canonical_level: int = 4,
    representation_size: int = 256,
    box_coder_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
    box_batch_size_per_image: int = 512,
    box_positive_fraction: float = 0.25,
    box_fg_iou_thresh: float = 0.5,
    box_bg_iou_thresh: float = 0.5,
    box_score_thresh: float = 0.05,
    box_nms_thresh: float = 0.5,
    box_detections_per_img: int = 100,
    proposals: nn.Module | None = None,
) -> FasterRCNN:
    """Assemble a Faster R-CNN from a backbone (with ``out_channels`` and named feature maps).

    ``num_classes`` includes background and comes from the dataset, never from the model config.
    Defaults follow torchvision's ``FasterRCNN`` except the sizes, which suit the built-in data.
    ``min_size``: one size, or several for multi-scale training (a random one per image, as
    torchvision; evaluation uses the last). ``proposals``: a proposal source instead of the RPN
    (Fast R-CNN mode; the ``rpn_*`` and anchor arguments are then unused).
    """
    rpn = None if proposals is not None else _build_rpn(
        backbone.out_channels, anchor_sizes, aspect_ratios, rpn_pre_nms_top_n_train, rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_train, rpn_post_nms_top_n_test, rpn_nms_thresh, rpn_fg_iou_thresh, rpn_bg_iou_thresh,
        rpn_batch_size_per_image, rpn_positive_fraction, rpn_box_loss)
    roi_align = MultiScaleRoIAlign(
        list(roi_featmap_names), roi_output_size, roi_sampling_ratio,
        canonical_scale=roi_canonical_scale, canonical_level=roi_canonical_level)
    roi_head = RoIBoxHead(
        roi_align, backbone.out_channels, num_classes, box_loss, representation_size, tuple(box_coder_weights),
        box_fg_iou_thresh, box_bg_iou_thresh, box_batch_size_per_image, box_positive_fraction,
        box_score_thresh, box_nms_thresh, box_detections_per_img)
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    transform = GeneralizedRCNNTransform(sizes, max_size, list(image_mean), list(image_std))
    return FasterRCNN(transform, backbone, rpn, roi_head, proposals)


def _build_rpn(
    in_channels: int, anchor_sizes, aspect_ratios, pre_train, pre_test, post_train, post_test, nms_thresh,
    fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction, box_loss: BoxLoss | None,
) -> RPN:
    anchor_gen = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    return RPN(
        anchor_gen, RPNHead(in_channels, anchor_gen.num_anchors_per_location()[0]),
        fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction,
        dict(training=pre_train, testing=pre_test), dict(training=post_train, testing=post_test), nms_thresh,
        box_loss=box_loss if box_loss is not None else SmoothL1(beta=1 / 9),
    )
