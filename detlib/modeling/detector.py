"""Faster R-CNN: transform -> backbone -> RPN -> RoI box head, composed from parts passed in.

``model(images, targets)`` always returns the same thing, a dict with
``"losses"`` (when targets are given, in train *and* eval mode, so validation loss is free) and
``"detections"`` (when ``detect=True``; by default in eval mode), so no caller has to guess.

Fast R-CNN mode (``model=fast_rcnn``): a proposal source (``detlib.modeling.proposals``) replaces
the RPN; the losses then simply have no ``loss_rpn_*`` terms.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from detlib.losses import BoxLoss
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
    num_classes: int,
    box_loss: BoxLoss,
    rpn_box_loss: BoxLoss | None,
    *,
    backbone: nn.Module,
    rpn: Callable[..., RPN] | None,
    roi_head: Callable[..., RoIBoxHead],
    min_size: int | Sequence[int],
    max_size: int,
    image_mean: Sequence[float],
    image_std: Sequence[float],
    proposals: nn.Module | None = None,
) -> FasterRCNN:
    """Assemble a Faster R-CNN from its configured parts (``configs/model/``, defaults in ``base/faster_rcnn.yaml``).

    ``num_classes`` (with background) comes from the dataset and the two box losses from ``loss`` and
    ``rpn_loss``, never from the model config: ``instantiate(cfg.model, num_classes=..., box_loss=...,
    rpn_box_loss=...)``. ``backbone`` is built (it has ``out_channels`` and named feature maps); ``rpn``
    (``build_rpn``) and ``roi_head`` (``RoIBoxHead``) are partials (``_partial_: true``) that get the
    backbone's channels, the classes and their box loss here. ``min_size``: one size, or several for
    multi-scale training (a random one per image, as torchvision; evaluation uses the last).
    ``proposals``: a proposal source instead of the RPN (Fast R-CNN mode, ``rpn: null``).
    """
    if rpn is not None and rpn_box_loss is None:
        raise ValueError("build_faster_rcnn: the RPN needs rpn_box_loss (configs/rpn_loss)")
    sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    return FasterRCNN(
        GeneralizedRCNNTransform(sizes, max_size, list(image_mean), list(image_std)),
        backbone,
        None if rpn is None else rpn(in_channels=backbone.out_channels, box_loss=rpn_box_loss),
        roi_head(in_channels=backbone.out_channels, num_classes=num_classes, box_loss=box_loss),
        proposals,
    )


def build_rpn(
    in_channels: int,
    box_loss: BoxLoss,
    *,
    anchor_sizes: Sequence[Sequence[int]],
    aspect_ratios: Sequence[float],
    pre_nms_top_n_train: int,
    pre_nms_top_n_test: int,
    post_nms_top_n_train: int,
    post_nms_top_n_test: int,
    nms_thresh: float,
    fg_iou_thresh: float,
    bg_iou_thresh: float,
    batch_size_per_image: int,
    positive_fraction: float,
) -> RPN:
    """The RPN (``model.rpn``): ``anchor_sizes`` per feature map, the same ``aspect_ratios`` on every map."""
    anchor_gen = AnchorGenerator(tuple(tuple(s) for s in anchor_sizes), (tuple(aspect_ratios),) * len(anchor_sizes))
    return RPN(
        anchor_gen, RPNHead(in_channels, anchor_gen.num_anchors_per_location()[0]),
        fg_iou_thresh, bg_iou_thresh, batch_size_per_image, positive_fraction,
        dict(training=pre_nms_top_n_train, testing=pre_nms_top_n_test),
        dict(training=post_nms_top_n_train, testing=post_nms_top_n_test), nms_thresh,
        box_loss=box_loss,
    )
