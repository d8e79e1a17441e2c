"""Annotation noise: training split only, deterministic by seed, realised statistics, valid boxes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from omegaconf import OmegaConf

from detlib.config import check_ranges
from detlib.data.build import build_datasets
from detlib.data.noise import box_iou_1to1, gross_error, jitter_boxes, perturb_targets

from .conftest import compose_cfg
from .fixtures import write_coco


def _targets(n_images: int = 50, seed: int = 0):
    rng = np.random.default_rng(seed)
    targets, sizes = {}, {}
    for i in range(1, n_images + 1):
        k = int(rng.integers(1, 6))
        xy = rng.uniform(0, 60, (k, 2))
        wh = rng.uniform(4, 40, (k, 2))
        targets[i] = (np.concatenate([xy, xy + wh], 1).astype(np.float32), np.ones(k, np.int64))
        sizes[i] = (100.0, 100.0)
    return targets, sizes


def _all(targets) -> np.ndarray:
    return np.concatenate([targets[i][0] for i in sorted(targets)])


def test_outlier_fraction_is_realised_and_outliers_are_far_off():
    targets, sizes = _targets()
    noisy, stats = perturb_targets(targets, sizes, jitter=0.0, outliers=0.3, seed=0)
    a, b = _all(targets), _all(noisy)
    changed = np.abs(b - a).max(1) > 0
    assert stats["boxes"] == len(a) and stats["outliers"] == round(0.3 * len(a)) and stats["outlier_failures"] == 0
    assert changed.sum() == stats["outliers"] and stats["fraction_changed"] == pytest.approx(changed.mean())
    assert stats["outlier_fraction"] == pytest.approx(0.3, abs=0.5 / len(a))
    assert (box_iou_1to1(a[changed], b[changed]) <= 0.5).all()  # gross errors, not small shifts
    assert stats["mean_iou"] == pytest.approx(box_iou_1to1(a, b).mean())
    assert ((b[:, 2:] - b[:, :2]) >= 1).all() and (b >= 0).all() and (b <= 100).all()
    for i in targets:
        assert np.array_equal(noisy[i][1], targets[i][1])  # labels untouched


def test_jitter_is_relative_to_box_size():
    targets, sizes = _targets(200)
    noisy, stats = perturb_targets(targets, sizes, jitter=0.05, outliers=0.0, seed=1)
    a, b = _all(targets), _all(noisy)
    rel = np.abs(b - a) / np.tile(a[:, 2:] - a[:, :2], 2)
    # |N(0, s)| has mean s * sqrt(2 / pi); clipping at the image border only makes it smaller
    assert stats["mean_rel_shift"] == pytest.approx(rel.mean())
    assert 0.8 * 0.05 * np.sqrt(2 / np.pi) < rel.mean() < 1.05 * 0.05 * np.sqrt(2 / np.pi)
    assert stats["fraction_changed"] > 0.95 and stats["outliers"] == 0


def test_deterministic_by_seed():
    targets, sizes = _targets()
    n1, s1 = perturb_targets(targets, sizes, 0.1, 0.2, seed=3)
    n2, s2 = perturb_targets(targets, sizes, 0.1, 0.2, seed=3)
    n3, _ = perturb_targets(targets, sizes, 0.1, 0.2, seed=4)
    assert np.array_equal(_all(n1), _all(n2)) and s1 == s2
    assert not np.array_equal(_all(n1), _all(n3))


def test_nothing_asked_nothing_changed():
    targets, sizes = _targets(5)
    noisy, stats = perturb_targets(targets, sizes, 0.0, 0.0)
    assert np.array_equal(_all(noisy), _all(targets)) and stats["fraction_changed"] == 0.0


def test_jitter_never_makes_an_invalid_box():
    rng = np.random.default_rng(0)
    boxes = np.array([[0, 0, 2, 2], [97, 97, 100, 100], [10, 10, 60, 12]], np.float32)
    out = jitter_boxes(boxes, 2.0, 100, 100, rng)  # absurd sigma: edges cross, boxes leave the image
    assert ((out[:, 2:] - out[:, :2]) >= 1).all() and (out >= 0).all() and (out <= 100).all()


def test_gross_error_of_a_box_filling_its_image_shrinks_it():
    rng = np.random.default_rng(0)
    full = np.array([0, 0, 100, 80], np.float32)
    for _ in range(10):
        out = gross_error(full, 100, 80, rng)
        assert out is not None and box_iou_1to1(out[None], full[None])[0] <= 0.5
    assert gross_error(np.array([0, 0, 2, 2], np.float32), 2, 2, rng) is None  # nothing far off fits


@pytest.mark.parametrize("override,key", [("data.noise.jitter=-0.1", "data.noise.jitter"),
                                          ("data.noise.outliers=1.5", "data.noise.outliers")])
def test_ranges_are_checked(override, key):
    with pytest.raises(ValueError, match=key):
        check_ranges(OmegaConf.to_object(compose_cfg(override)))


def test_outliers_corrupt_the_training_boxes_and_val_stays_untouched(tmp_path, caplog):
    """The issue's acceptance check: data.noise.outliers=0.3 measurably corrupts train, never val."""
    write_coco(tmp_path, num_train=24, num_val=6)
    common = ["data=coco", f"data.root={tmp_path}", "data.train_ann=train.json", "data.train_images=images",
              "data.val_ann=val.json", "data.val_images=images"]
    clean_train, clean_val = build_datasets(OmegaConf.to_object(compose_cfg(*common)).data)
    with caplog.at_level(logging.INFO):
        train, val = build_datasets(OmegaConf.to_object(compose_cfg(*common, "data.noise.outliers=0.3",
                                                                    "data.noise.jitter=0.02")).data)
    assert "annotation noise" in caplog.text and "outlier_fraction" in caplog.text
    a = np.concatenate([clean_train.boxes(i) for i in clean_train.ids])
    b = np.concatenate([train.boxes(i) for i in train.ids])
    far = box_iou_1to1(a, b) <= 0.5
    assert far.mean() == pytest.approx(0.3, abs=1 / len(a)) and train.noise_stats["outliers"] == far.sum()
    assert train[0][1]["boxes"].numpy().tolist() != clean_train[0][1]["boxes"].numpy().tolist()
    for i in val.ids:
        assert np.array_equal(val.boxes(i), clean_val.boxes(i))
    assert val.coco.dataset["annotations"] == clean_val.coco.dataset["annotations"] and val.noise_stats == {}
    again, _ = build_datasets(OmegaConf.to_object(compose_cfg(*common, "data.noise.outliers=0.3",
                                                              "data.noise.jitter=0.02")).data)
    assert all(np.array_equal(again.boxes(i), train.boxes(i)) for i in train.ids)  # fixed at build time
