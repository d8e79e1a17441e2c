"""Fast R-CNN mode: proposals from a file or jittered ground truth instead of an RPN; training and eval with every loss."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchvision.ops import box_iou

from detlib.data.build import build_datasets
from detlib.engine.build import build_model
from detlib.engine.trainer import Job, train
from detlib.modeling.proposals import (
    FileProposals,
    GTJitterProposals,
    ProposalError,
    build_proposal_source,
    check_proposal_ids,
)

from .conftest import CONFIGS, compose_cfg
from .fixtures import write_coco

LOSSES = sorted(p.stem for p in Path(CONFIGS, "loss").glob("*.yaml"))


def _write(tmp_path: Path, obj, suffix: str = ".json") -> Path:
    path = tmp_path / f"proposals{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(obj))
    else:
        path.write_bytes(pickle.dumps(obj))
    return path


def _target(image_id: int, boxes=((0.0, 0.0, 1.0, 1.0),), **kw) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.ones(len(boxes),
            dtype=torch.int64), "image_id": image_id, **kw}


# ---- the file source

def test_json_top_k_by_score_and_file_order_without_scores(tmp_path):
    path = _write(tmp_path, {"1": {"boxes": [[0, 0, 5, 5], [1, 1, 9, 9], [2, 2, 4, 4]], "scores": [0.1, 0.9, 0.5]},
                             "2": [[0, 0, 3, 3], [1, 1, 2, 2], [0, 0, 1, 1]], "3": []})
    src = FileProposals(str(path), top_k=2)
    assert src.boxes[1].tolist() == [[1, 1, 9, 9], [2, 2, 4, 4]]
    assert src.boxes[2].tolist() == [[0, 0, 3, 3], [1, 1, 2, 2]]
    assert src.boxes[3].shape == (0, 4)


def test_pickle_in_detectron2_layout_with_xywh(tmp_path):
    obj = {"ids": [4, 5], "boxes": [np.array([[1, 2, 3, 4]], np.float32), np.zeros((0, 4))],
           "objectness_logits": [np.array([0.3]), np.zeros(0)], "bbox_mode": 1}
    src = FileProposals(str(_write(tmp_path, obj, ".pkl")))
    assert src.boxes[4].tolist() == [[1, 2, 4, 6]] and src.boxes[5].shape == (0, 4)


@pytest.mark.parametrize("obj,needle", [
    ({"7": [[0, 0, 5]]}, "image id 7: boxes must have shape (N, 4), got (1, 3)"),
    ({"7": [[0, 0, 5, float("nan")]]}, "image id 7: non-finite box"),
    ({"7": [[5, 0, 1, 5]]}, "image id 7: box [5.0, 0.0, 1.0, 5.0] has x2 < x1"),
    ({"7": {"boxes": [[0, 0, 1, 1]], "scores": [0.1, 0.2]}}, "image id 7: scores must be 1 finite numbers"),
    ({"seven": [[0, 0, 1, 1]]}, "image id 'seven' is not an integer"),
    ([[0, 0, 1, 1]], "unknown layout list"),
])
def test_bad_files_name_file_image_id_and_value(tmp_path, obj, needle):
    path = _write(tmp_path, obj)
    with pytest.raises(ProposalError) as e:
        FileProposals(str(path))
    assert str(path) in str(e.value) and needle in str(e.value)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        FileProposals(str(tmp_path / "nope.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ProposalError, match="bad.json: cannot read proposals"):
        FileProposals(str(tmp_path / "bad.json"))


def test_missing_image_ids_are_named_before_training(tmp_path):
    path = _write(tmp_path, {"1": [[0, 0, 4, 4]], "2": [[0, 0, 4, 4]]})
    model = _model(compose_cfg("model=fast_rcnn", f"model.proposals.file={path}"))
    check_proposal_ids(model, train=[1, 2])
    with pytest.raises(ProposalError, match=r"proposals.json: no proposals for 2 val image ids, first: \[3, 9\]"):
        check_proposal_ids(model, train=[1, 2], val=[1, 3, 9])
    with pytest.raises(ProposalError, match="no proposals for image id 5"):
        model.proposals([_target(5)], [(10, 10)], [(10, 10)])


def test_file_boxes_follow_the_flip_and_the_resize(tmp_path):
    src = FileProposals(str(_write(tmp_path, {"1": [[2, 4, 10, 8]]})))
    (plain,) = src([_target(1)], [(20, 40)], [(40, 80)])  # original (H, W) = (20, 40), resized x2
    assert plain.tolist() == [[4, 8, 20, 16]]
    (flipped,) = src([_target(1, hflip=True)], [(20, 40)], [(40, 80)])
    assert flipped.tolist() == [[2 * (40 - 10), 8, 2 * (40 - 2), 16]]


def test_the_model_rescales_file_proposals_with_its_transform(tmp_path):
    """A 24x32 image resized to 48x64 (min_size 48): the sampled RoIs are the file's boxes times 2 (plus GT)."""
    path = _write(tmp_path, {"1": [[2, 2, 10, 12], [4, 6, 20, 20]]})
    model = _model(compose_cfg("model=fast_rcnn", f"model.proposals.file={path}", "model.min_size=48",
                               "model.max_size=200"))
    out = model([torch.rand(3, 24, 32)], [_target(1, [[0, 0, 8, 8]])])
    rois = {tuple(b) for b in out["diagnostics"]["dump/proposals"].tolist()}
    assert rois == {(4.0, 4.0, 20.0, 24.0), (8.0, 12.0, 40.0, 40.0), (0.0, 0.0, 16.0, 16.0)}
    assert model.rpn is None and not any(k.startswith("rpn.") for k in model.state_dict())


# ---- jittered ground truth

def test_gt_jitter_is_deterministic_per_seed_image_and_iteration():
    src = GTJitterProposals(per_gt=8, jitter=0.15, num_background=16, seed=0)
    gt = [[10.0, 10.0, 40.0, 30.0], [50, 5, 60, 60]]

    def run(image_id=1, aug_seed=None, source=src):
        return source([_target(image_id, gt, **({} if aug_seed is None else {"aug_seed": aug_seed}))],
                      [(64, 96)], [(64, 96)])[0]

    a = run(aug_seed=123)
    assert torch.equal(a, run(aug_seed=123))
    assert not torch.equal(a, run(aug_seed=124)) and not torch.equal(a, run(image_id=2, aug_seed=123))
    assert not torch.equal(a, run(aug_seed=123, source=GTJitterProposals(8, 0.15, 16, seed=1)))
    assert torch.equal(run(), run())  # evaluation: fixed boxes per image
    assert a.shape[0] == 2 * 8 + 16  # nothing here is small enough to be dropped
    assert (a[:, 2:] - a[:, :2] >= 1).all() and (a >= 0).all() and (a[:, 2] <= 96).all() and (a[:, 3] <= 64).all()
    ious = box_iou(a[:16], torch.tensor(gt)).max(1).values
    assert (ious > 0.5).any() and (ious < 0.9).any()  # a spread around the foreground threshold
    assert box_iou(a[16:], torch.tensor(gt)).max(1).values.lt(0.5).sum() > 8  # mostly background


def test_source_selection_and_errors(tmp_path):
    path = _write(tmp_path, {"1": [[0, 0, 4, 4]]})
    assert isinstance(build_proposal_source(file=str(path)), FileProposals)
    assert isinstance(build_proposal_source(), GTJitterProposals)
    with pytest.raises(ValueError, match="needs model.proposals.file"):
        build_proposal_source("file")
    with pytest.raises(ValueError, match="also set"):
        build_proposal_source("gt_jitter", str(path))
    with pytest.raises(ValueError, match="file|gt_jitter"):
        build_proposal_source("rpn")


def test_no_targets_is_a_clear_error():
    model = _model(compose_cfg("model=fast_rcnn", "model.min_size=64", "model.max_size=96")).eval()
    with pytest.raises(ValueError, match="pass targets"):
        model([torch.rand(3, 64, 64)])


# ---- every loss trains and evaluates

def _model(cfg, num_classes: int = 3):
    torch.manual_seed(0)
    return build_model(cfg, num_classes)


@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_one_step_and_detections_without_rpn_terms(loss):
    cfg = compose_cfg("model=fast_rcnn", f"loss={loss}", "model.min_size=64", "model.max_size=96")
    model = _model(cfg)
    images = [torch.rand(3, 64, 96), torch.rand(3, 96, 64)]
    targets = [_target(1, [[10, 10, 40, 30]], aug_seed=5), _target(2, [[5, 20, 50, 70], [0, 0, 20, 20]], aug_seed=6)]
    targets[1]["labels"] = torch.tensor([1, 2])
    out = model(images, targets)
    assert set(out["losses"]) == {"loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in out["losses"].values()) and out["losses"]["loss_box_reg"] > 0
    sum(out["losses"].values()).backward()
    assert model.roi_head.bbox_pred.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        det = model(images, targets, detect=True)
    assert len(det["detections"]) == 2 and set(det["losses"]) == {"loss_cls", "loss_box_reg"}


@pytest.fixture(scope="module")
def coco_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root)
    return root


def _train(coco_data, run_dir, *overrides):
    cfg = compose_cfg("data=coco", f"data.root={coco_data}", "data.train_ann=train.json", "data.train_images=images",
                      "data.val_ann=val.json", "data.val_images=images", "model=fast_rcnn", "model.min_size=64",
                      "model.max_size=96", "data.num_workers=0", *overrides)
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    model = _model(cfg, train_set.num_classes)
    check_proposal_ids(model, train=train_set.ids, val=val_set.ids)
    tcfg = dataclasses.replace(typed.trainer, max_iters=3, warmup_iters=1, log_period=1, progress=False, device="cpu")
    return train(Job(model, train_set, val_set, dataclasses.replace(typed, trainer=tcfg), run_dir))


def test_trains_and_evaluates_on_gt_jitter(coco_data, tmp_path):
    stats = _train(coco_data, tmp_path)
    assert stats["AP50"] is not None and 0 <= stats["AP50"] <= 1
    assert (tmp_path / "metrics.json").is_file()


def test_trains_and_evaluates_on_a_proposals_file(coco_data, tmp_path):
    """Proposals around each GT box (as a good external proposer would give) plus a few far-off ones."""
    data = {}
    for split in ("train", "val"):
        d = json.loads((coco_data / f"{split}.json").read_text())
        for im in d["images"]:
            data.setdefault(str(im["id"]), {"boxes": [[0, 0, 16, 16], [30, 20, 60, 60]], "scores": [0.1, 0.2]})
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            entry = data[str(a["image_id"])]
            entry["boxes"] += [[x + 1, y + 1, x + w - 1, y + h], [x, y, x + w + 2, y + h - 1]]
            entry["scores"] += [0.9, 0.8]
    path = _write(tmp_path, data)
    stats = _train(coco_data, tmp_path / "run", f"model.proposals.file={path}", "model.proposals.top_k=50")
    assert stats["AP50"] is not None and 0 <= stats["AP50"] <= 1
