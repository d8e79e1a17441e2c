"""The built-in dataset: deterministic, COCO-loadable, cached by its parameters."""

from __future__ import annotations

import json

from pycocotools.coco import COCO

from detlib.data.coco import CocoDetection
from detlib.data.synthetic import CATEGORY_IDS, SyntheticSpec, build_synthetic, make_image

SPEC = SyntheticSpec(num_train=12, num_val=4, seed=3)


def test_deterministic_and_cached(tmp_path):
    a = build_synthetic(tmp_path / "a", SPEC)
    b = build_synthetic(tmp_path / "b", SPEC)
    assert a.name == b.name
    assert (a / "instances_train.json").read_text() == (b / "instances_train.json").read_text()
    assert (a / "train/000005.png").read_bytes() == (b / "train/000005.png").read_bytes()
    mtime = (a / "instances_train.json").stat().st_mtime_ns
    assert build_synthetic(tmp_path / "a", SPEC) == a  # reused, not rebuilt
    assert (a / "instances_train.json").stat().st_mtime_ns == mtime
    other = build_synthetic(tmp_path / "a", SyntheticSpec(num_train=12, num_val=4, seed=4))
    assert other != a  # new parameters, new folder


def test_images_differ_by_seed_and_content_is_sane():
    img0, objs0 = make_image(SPEC, "train", 0)
    img1, _ = make_image(SyntheticSpec(seed=99), "train", 0)
    assert img0.shape == (128, 128, 3) and (img0 != img1).any()
    assert SPEC.min_objects <= len(objs0) <= SPEC.max_objects
    counts = [len(make_image(SPEC, "train", i)[1]) for i in range(30)]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 2


def test_loads_with_pycocotools_and_our_loader(tmp_path):
    folder = build_synthetic(tmp_path, SPEC)
    coco = COCO(str(folder / "instances_train.json"))
    assert len(coco.getImgIds()) == 12 and sorted(coco.getCatIds()) == list(CATEGORY_IDS)
    info = json.loads((folder / "instances_val.json").read_text())
    assert all(a["id"] > 0 and a["bbox"][2] > 0 for a in info["annotations"])
    ds = CocoDetection(folder / "instances_train.json", folder, train=True, hflip_prob=0.5)
    image, target = ds[0]
    assert image.shape == (3, 128, 128) and 0 <= image.min() and image.max() <= 1
    assert target["boxes"].shape[1] == 4 and (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()
    assert ds.num_classes == len(CATEGORY_IDS) + 1
    assert ds.label_to_cat == {i + 1: c for i, c in enumerate(CATEGORY_IDS)}
    # the same augmentation seed gives the same sample; flipping moves boxes
    a, ta = ds[(0, 7)]
    b, tb = ds[(0, 7)]
    assert (a == b).all() and (ta["boxes"] == tb["boxes"]).all()
    flips = {bool((ds[(0, s)][0] != image).any()) for s in range(12)}
    assert flips == {True, False}
