"""The built-in dataset: deterministic, COCO-loadable, cached by its parameters."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time

import pytest
from pycocotools.coco import COCO

from detlib.data.coco import CocoDetection
from detlib.data.synthetic import CATEGORY_IDS, SyntheticSpec, build_synthetic, make_image
from detlib.data.validation import AnnotationError

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


# ---- building under concurrency, and a damaged cache

TINY = SyntheticSpec(num_train=40, num_val=8, image_size=64, seed=5)
BUILD_AND_READ = """
import hashlib, json, sys, time
from PIL import Image
from detlib.data.synthetic import SyntheticSpec, build_synthetic
root, start = sys.argv[1], float(sys.argv[2])
while time.time() < start:
    pass
folder = build_synthetic(root, SyntheticSpec(num_train=40, num_val=8, image_size=64, seed=5))
digest = hashlib.sha1()
for split in ("train", "val"):
    text = (folder / f"instances_{split}.json").read_text()
    digest.update(text.encode())
    for image in json.loads(text)["images"]:
        with Image.open(folder / image["file_name"]) as im:
            digest.update(im.tobytes())
print(folder.name, digest.hexdigest())
"""


def _builders(root, delays: tuple[float, ...] = (0.0,)) -> list[subprocess.Popen]:
    """One process per delay, each building ``TINY`` under ``root`` (and reading it all back) that many
    seconds after a common start, which is after their imports."""
    start = time.time() + 1.5
    return [subprocess.Popen([sys.executable, "-c", BUILD_AND_READ, str(root), str(start + d)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for d in delays]


def test_concurrent_builds_both_succeed_with_identical_results(tmp_path):
    """The second build starts 0 to 60 ms after the first (a build takes about 90 ms): the first one
    finishes and reads while the second is still writing."""
    outputs = set()
    for round_ in range(2):
        roots = [tmp_path / f"{round_}-{k}" for k in range(4)]
        procs = [p for k, root in enumerate(roots) for p in _builders(root, (0.0, 0.015 * (4 * round_ + k)))]
        results = [p.communicate(timeout=120) for p in procs]
        for p, (out, err) in zip(procs, results):
            assert p.returncode == 0, err
            outputs.add(out.strip())
        for root in roots:
            assert [q.name for q in root.iterdir()] == [f"synthetic-{TINY.key()}"]  # the loser's copy is gone
    assert len(outputs) == 1  # the same dataset every time, in every process


def test_the_dataset_folder_never_appears_incomplete(tmp_path):
    folder = tmp_path / f"synthetic-{TINY.key()}"
    proc = _builders(tmp_path)[0]
    seen_complete = False
    while proc.poll() is None:
        if folder.exists():
            assert (folder / "DONE").exists() and (folder / "instances_val.json").exists()
            seen_complete = True
    assert proc.returncode == 0, proc.stderr.read()
    assert seen_complete or (folder / "DONE").exists()


def test_damaged_cache_is_an_error_naming_the_folder_to_delete(tmp_path):
    from omegaconf import OmegaConf

    from detlib.data.build import build_datasets

    from .conftest import compose_cfg

    folder = build_synthetic(tmp_path, TINY)
    (folder / "train/000003.png").unlink()
    with pytest.raises(AnnotationError, match=rf"cache {re.escape(str(folder))} is damaged \(image train/000003.png "
                                              r"is missing\); delete that folder"):
        build_synthetic(tmp_path, TINY)
    shutil.rmtree(folder)
    folder = build_synthetic(tmp_path, TINY)  # rebuilt once deleted
    (folder / "instances_val.json").write_text('{"images": [')
    with pytest.raises(AnnotationError, match=rf"cache {re.escape(str(folder))} is damaged \(instances_val.json"):
        build_synthetic(tmp_path, TINY)
    shutil.rmtree(folder)
    folder = build_synthetic(tmp_path, TINY)
    data = (folder / "train/000007.png").read_bytes()
    (folder / "train/000007.png").write_bytes(data[: len(data) // 2])  # cut short: only decoding can tell
    cfg = compose_cfg("data=synthetic", f"data.root={tmp_path}", "data.synthetic.num_train=40",
                      "data.synthetic.num_val=8", "data.synthetic.image_size=64", "data.synthetic.seed=5")
    with pytest.raises(AnnotationError, match=rf"cache {re.escape(str(folder))} is damaged .*000007.png.*"
                                              r"delete that folder") as e:
        build_datasets(OmegaConf.to_object(cfg).data)
    assert "data.invalid=skip" not in str(e.value)


def test_an_interrupted_build_of_an_older_version_is_replaced(tmp_path):
    folder = tmp_path / f"synthetic-{TINY.key()}"
    (folder / "train").mkdir(parents=True)
    (folder / "train/000000.png").write_bytes(b"half")  # built in place, no DONE
    assert build_synthetic(tmp_path, TINY) == folder and (folder / "DONE").exists()
    assert [q.name for q in tmp_path.iterdir()] == [folder.name]


def test_read_only_home_before_the_cache_exists_says_to_set_data_root(tmp_path):
    """A read-only filesystem (a real ro tmpfs, as a container's HOME): one error naming data.root."""
    from detlib.data.synthetic import SyntheticSpec, build_synthetic

    home = tmp_path / "home"
    home.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(home)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        with pytest.raises(ValueError, match=rf"data\.root={home}/\.cache/detlib: cannot write .*"
                                             r"Read-only file system.*set data\.root to a writable folder"):
            build_synthetic(home / ".cache" / "detlib", SyntheticSpec(num_train=2, num_val=1))
    finally:
        subprocess.run(["umount", str(home)], check=True)
