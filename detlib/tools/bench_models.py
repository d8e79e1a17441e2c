"""The two models ``benchmark.py`` races: ours from ``configs/model/``, torchvision's ``FasterRCNN`` from
copies of our parts (same types, same weights, same settings), and random data for large images."""

from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset
from torchvision.models.detection import FasterRCNN as TVFasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

from detlib.compose import compose_train
from detlib.engine.build import build_model
from detlib.modeling.detector import FasterRCNN


class RandomDetection(Dataset):
    """Noise images ``(3, size, size)`` with 1-6 random boxes of ``num_classes - 1`` labels, fixed per index."""

    def __init__(self, size: int, length: int = 512, num_classes: int = 5) -> None:
        self.size, self.length, self.num_classes = size, length, num_classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        index = item[0] if isinstance(item, tuple) else item
        g = torch.Generator().manual_seed(index)
        n = int(torch.randint(1, 7, (), generator=g))
        xy = torch.rand(n, 2, generator=g) * self.size * 0.7
        wh = (torch.rand(n, 2, generator=g) * 0.25 + 0.05) * self.size
        boxes = torch.cat([xy, (xy + wh).clamp(max=self.size)], 1)
        labels = torch.randint(1, self.num_classes, (n,), generator=g)
        return torch.rand(3, self.size, self.size, generator=g), {"boxes": boxes, "labels": labels, "image_id": index}


def build_ours(model: str, num_classes: int, image_size: int | None) -> FasterRCNN:
    """Our detector from ``configs/train.yaml`` with ``model=NAME`` (Hydra compose, as train.py)."""
    overrides = [f"model={model}"]
    if image_size:
        overrides += [f"model.min_size={image_size}", f"model.max_size={image_size}"]
    return build_model(compose_train(overrides), num_classes)


def _torchvision_pooler(pool: MultiScaleRoIAlign) -> MultiScaleRoIAlign:
    """torchvision's own pooler (its RoIAlign kernel) with ``pool``'s settings: the reference is torchvision's."""
    if getattr(pool, "aligned", False):
        raise ValueError("torchvision's MultiScaleRoIAlign has no aligned=True")
    return MultiScaleRoIAlign(list(pool.featmap_names), pool.output_size, pool.sampling_ratio,
                              canonical_scale=pool.canonical_scale, canonical_level=pool.canonical_level)


def build_torchvision(ours: FasterRCNN, num_classes: int) -> TVFasterRCNN:
    """torchvision's ``FasterRCNN`` from copies of our parts (same types and weights), same settings."""
    rpn, head = ours.rpn, ours.roi_head
    box_head = TwoMLPHead(head.mlp.fc6.in_features, head.mlp.fc6.out_features)
    box_head.load_state_dict(head.mlp.state_dict())
    predictor = FastRCNNPredictor(head.cls_score.in_features, num_classes)
    predictor.load_state_dict({**{f"cls_score.{k}": v for k, v in head.cls_score.state_dict().items()},
                               **{f"bbox_pred.{k}": v for k, v in head.bbox_pred.state_dict().items()}})
    t = ours.transform
    return TVFasterRCNN(
        copy.deepcopy(ours.backbone), num_classes=None, min_size=t.min_size, max_size=t.max_size,
        image_mean=t.image_mean, image_std=t.image_std,
        rpn_anchor_generator=copy.deepcopy(rpn.anchor_generator), rpn_head=copy.deepcopy(rpn.head),
        rpn_pre_nms_top_n_train=rpn._pre_nms_top_n["training"], rpn_pre_nms_top_n_test=rpn._pre_nms_top_n["testing"],
        rpn_post_nms_top_n_train=rpn._post_nms_top_n["training"],
        rpn_post_nms_top_n_test=rpn._post_nms_top_n["testing"], rpn_nms_thresh=rpn.nms_thresh,
        rpn_fg_iou_thresh=rpn.proposal_matcher.high_threshold, rpn_bg_iou_thresh=rpn.proposal_matcher.low_threshold,
        rpn_batch_size_per_image=rpn.fg_bg_sampler.batch_size_per_image,
        rpn_positive_fraction=rpn.fg_bg_sampler.positive_fraction,
        box_roi_pool=_torchvision_pooler(head.roi_align), box_head=box_head, box_predictor=predictor,
        box_score_thresh=head.score_thresh, box_nms_thresh=head.nms_thresh,
        box_detections_per_img=head.detections_per_img, box_fg_iou_thresh=head.matcher.high_threshold,
        box_bg_iou_thresh=head.matcher.low_threshold, box_batch_size_per_image=head.sampler.batch_size_per_image,
        box_positive_fraction=head.sampler.positive_fraction, bbox_reg_weights=head.box_coder.weights)
