"""A COCO-format fixture on disk: aspect-ratio groups for the batch sampler, and training + evaluation end to end."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from omegaconf import OmegaConf

from detlib.data.build import build_datasets
from detlib.data.sampler import TrainBatchSampler
from detlib.engine.build import build_model
from detlib.engine.trainer import Job, train

from .conftest import compose_cfg
from .fixtures import write_coco


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    write_coco(root, num_train=8, num_val=4)
    return root


def _cfg(root, *overrides):
    return compose_cfg("data=coco", f"data.root={root}", "data.train_ann=train.json", "data.train_images=images",
                       "data.val_ann=val.json", "data.val_images=images", "data.num_workers=0", *overrides)


def test_aspect_group_ids_from_width_and_height(coco_root):
    train_set, _ = build_datasets(OmegaConf.to_object(_cfg(coco_root)).data)  # coco.yaml groups by default
    assert train_set.aspect_ratios() == [1.5, 2 / 3] * 4
    assert train_set.group_ids == [1, 0] * 4  # landscape 1, portrait 0
    assert train_set.aspect_group_ids(bins=3) == [5, 2] * 4  # torchvision's 2 ** linspace(-1, 1, 7) bins
    off, _ = build_datasets(OmegaConf.to_object(_cfg(coco_root, "data.aspect_grouping=false")).data)
    assert off.group_ids is None


def test_grouped_batches_hold_one_orientation(coco_root):
    train_set, _ = build_datasets(OmegaConf.to_object(_cfg(coco_root)).data)
    sampler = TrainBatchSampler(len(train_set), 2, seed=0, max_iters=12, group_ids=train_set.group_ids)
    for batch in sampler:
        shapes = {tuple(train_set[item][0].shape[-2:]) for item in batch}
        assert len(shapes) == 1, shapes


def test_coco_fixture_trains_and_evaluates_end_to_end(coco_root, tmp_path):
    cfg = _cfg(coco_root, "model.min_size=64", "model.max_size=96")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    assert train_set.label_to_cat == {1: 3, 2: 7}
    torch.manual_seed(0)
    model = build_model(cfg, train_set.num_classes)
    tcfg = dataclasses.replace(typed.trainer, max_iters=3, warmup_iters=1, log_period=1, progress=False, device="cpu")
    stats = train(Job(model, train_set, val_set, dataclasses.replace(typed, trainer=tcfg), tmp_path))
    assert set(stats) >= {"AP", "AP50"} and all(v is None or 0 <= v <= 1 for v in stats.values())
    detail = json.loads((tmp_path / "eval_detail.json").read_text())
    assert set(detail["per_class_ap"]) == {"red", "green"}
