"""The built-in dataset: coloured shapes on textured backgrounds, written to disk in COCO format.

Deterministic from a seed: image ``i`` of a split is drawn from its own ``numpy`` generator seeded by
``(seed, split, i)``, so the dataset is identical on every machine and can be built in any order.
It is written once under ``root/<hash of the parameters>/`` (PNG images plus
``instances_{train,val}.json``) and then read by the same COCO loader a real dataset uses.

Category ids are deliberately non-contiguous (10, 20, 30, ...) so the label <-> category-id
mapping is exercised on every run, as with COCO's 1..90.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from detlib.config import SyntheticConfig
from detlib.data.validation import AnnotationError

log = logging.getLogger(__name__)

CLASSES = ("rectangle", "ellipse", "triangle", "cross")
CATEGORY_IDS = (10, 20, 30, 40)
FORMAT_VERSION = 2  # bump when the generator changes, so caches rebuild


class SyntheticSpec(SyntheticConfig):
    """Parameters of the generated dataset: ``data.synthetic``'s fields and defaults
    (``detlib.config.SyntheticConfig``, the one list of them), plus the cache key; any change gives a new
    cache folder."""

    def key(self) -> str:
        blob = json.dumps({**asdict(self), "version": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A smooth colour gradient plus blotchy low-frequency texture and pixel noise, (H, W, 3) uint8."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(40, 215, 3), rng.uniform(40, 215, 3)
    angle = rng.uniform(0, 2 * np.pi)
    t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    coarse = rng.normal(0, 18, (size // 16, size // 16, 3)).astype(np.float32)
    img += np.kron(coarse, np.ones((16, 16, 1), np.float32))[:size, :size]
    img += rng.normal(0, 10, img.shape)
    return img


def _contrasting_colour(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour that differs from the mean ``background`` by at least 60 per channel on average."""
    mean = background.reshape(-1, 3).mean(0)
    for _ in range(50):
        c = rng.integers(0, 256, 3)
        if np.abs(c - mean).mean() > 60:
            break
    return tuple(int(v) for v in c)


def _draw_object(draw: ImageDraw.ImageDraw, rng: np.random.Generator, cls: int, box: np.ndarray,
                 background: np.ndarray) -> list[float]:
    """Draw shape ``cls`` inside ``box`` (x1, y1, x2, y2), in a colour that stands out; return its tight box."""
    x1, y1, x2, y2 = box.tolist()
    colour = _contrasting_colour(rng, background[int(y1):int(y2), int(x1):int(x2)])
    name = CLASSES[cls]
    if name == "rectangle":
        draw.rectangle([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif name == "ellipse":
        draw.ellipse([x1, y1, x2 - 1, y2 - 1], fill=colour)
    elif name == "triangle":
        apex = x1 + rng.uniform(0.0, 1.0) * (x2 - x1)
        pts = [(apex, y1), (x2 - 1, y2 - 1), (x1, y2 - 1)] if rng.random() < 0.5 else [
            (x1, y1), (x2 - 1, y1), (apex, y2 - 1)]
        draw.polygon(pts, fill=colour)
    else:  # cross: two bars through the centre
        w, h = x2 - x1, y2 - y1
        tw, th = max(2.0, w / 3), max(2.0, h / 3)
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        draw.rectangle([x1, cy - th / 2, x2 - 1, cy + th / 2 - 1], fill=colour)
        draw.rectangle([cx - tw / 2, y1, cx + tw / 2 - 1, y2 - 1], fill=colour)
    return [x1, y1, x2, y2]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    iw = np.clip(np.minimum(a[2], b[:, 2]) - np.maximum(a[0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[3], b[:, 3]) - np.maximum(a[1], b[:, 1]), 0, None)
    inter = iw * ih
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def make_image(spec: SyntheticSpec, split: str, index: int) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """Generate one image ``(H, W, 3) uint8`` and its objects as ``(class index, [x1, y1, x2, y2])``."""
    rng = np.random.default_rng([spec.seed, 0 if split == "train" else 1, index])
    s = spec.image_size
    pil = Image.fromarray(np.clip(_background(rng, s), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    # Clutter: thin random lines that are not objects, so the detector must learn shapes, not edges.
    for _ in range(rng.integers(0, 4)):
        pts = rng.uniform(0, s, 4).tolist()
        draw.line(pts, fill=tuple(int(c) for c in rng.integers(0, 256, 3)), width=1)
    boxes: list[np.ndarray] = []
    objects = []
    for _ in range(rng.integers(spec.min_objects, spec.max_objects + 1)):
        for _attempt in range(20):  # objects may overlap, but not hide each other
            side = np.exp(rng.uniform(np.log(spec.min_size), np.log(spec.max_size)))
            aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
            w = int(np.clip(round(side * np.sqrt(aspect)), spec.min_size * 0.7, s - 2))
            h = int(np.clip(round(side / np.sqrt(aspect)), spec.min_size * 0.7, s - 2))
            x1, y1 = int(rng.integers(0, s - w + 1)), int(rng.integers(0, s - h + 1))
            box = np.array([x1, y1, x1 + w, y1 + h], np.float64)
            if not boxes or _iou(box, np.stack(boxes)).max() < 0.3:
                break
        else:
            continue
        cls = int(rng.integers(len(CLASSES)))
        objects.append((cls, _draw_object(draw, rng, cls, box, np.asarray(pil))))
        boxes.append(box)
    return np.asarray(pil), objects


def _write_split(spec: SyntheticSpec, split: str, folder: Path) -> dict:
    n = spec.num_train if split == "train" else spec.num_val
    (folder / split).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in tqdm(range(n), desc=f"build {split}", unit="img", leave=False, disable=None):
        pixels, objects = make_image(spec, split, i)
        name = f"{split}/{i:06d}.png"
        Image.fromarray(pixels).save(folder / name, compress_level=1)
        image_id = i + 1  # COCO ids start at 1; 0 is reserved
        images.append(dict(id=image_id, file_name=name, width=spec.image_size, height=spec.image_size))
        for cls, (x1, y1, x2, y2) in objects:
            w, h = x2 - x1, y2 - y1
            annotations.append(dict(
                id=len(annotations) + 1, image_id=image_id, category_id=CATEGORY_IDS[cls],
                bbox=[x1, y1, w, h], area=w * h, iscrowd=0,
            ))
    categories = [dict(id=c, name=n, supercategory="shape") for c, n in zip(CATEGORY_IDS, CLASSES)]
    return dict(info=dict(description=f"detlib synthetic {split}", spec=asdict(spec)),
                images=images, annotations=annotations, categories=categories)


class DamagedCacheError(AnnotationError):
    """A built synthetic dataset folder that is incomplete or unreadable; the message names the folder to delete."""


def damaged(folder: Path, what: str) -> DamagedCacheError:
    return DamagedCacheError(f"the synthetic dataset cache {folder} is damaged ({what}); delete that folder "
                             "and run again to rebuild it")


def check_cache(folder: Path, spec: SyntheticSpec) -> None:
    """Cheap checks of a built folder: its marker matches ``spec``, both annotation files parse and
    list the expected number of images, and every image file is there and not empty.

    Raises:
        DamagedCacheError: naming the folder to delete.
    """
    try:
        marker = json.loads((folder / "DONE").read_text())
    except (OSError, ValueError) as e:
        raise damaged(folder, f"unreadable DONE marker: {e}") from e
    if marker != asdict(spec):
        raise damaged(folder, f"its DONE marker records {marker}, not {asdict(spec)}")
    for split, n in (("train", spec.num_train), ("val", spec.num_val)):
        path = folder / f"instances_{split}.json"
        try:
            images = json.loads(path.read_text())["images"]
            names = [im["file_name"] for im in images]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise damaged(folder, f"{path.name} is unreadable: {type(e).__name__}: {e}") from e
        if len(names) != n:
            raise damaged(folder, f"{path.name} lists {len(names)} images, not {n}")
        for name in names:
            try:
                empty = (folder / name).stat().st_size == 0
            except OSError:
                raise damaged(folder, f"image {name} is missing") from None
            if empty:
                raise damaged(folder, f"image {name} is empty")


def build_synthetic(root: str | os.PathLike, spec: SyntheticSpec) -> Path:
    """Write the dataset under ``root/synthetic-<spec key>/`` unless it is already there; return that folder.

    Safe under concurrency: the dataset is built in a private temporary folder next to the target and
    renamed into place in one step, so the target folder, once it exists, is complete; a process that
    loses the race to another discards its own copy (identical, being deterministic) and uses the
    winner's. An interrupted build leaves only a ``.synthetic-*.building-*`` folder, which is safe to
    delete. A completed folder found damaged is an error naming the folder to delete.
    """
    root = Path(root).expanduser()
    folder = root / f"synthetic-{spec.key()}"
    if folder.exists():
        if (folder / "DONE").exists():
            check_cache(folder, spec)
            return folder
        _move_aside(folder)  # left by an interrupted build of an older version, which built in place
    log.info("building the synthetic dataset in %s (%d train, %d val images)", folder, spec.num_train, spec.num_val)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.building-{os.getpid()}-", dir=root))
    except OSError as e:  # a read-only HOME (containers, clusters) before the cache exists
        raise ValueError(f"config: data.root={root}: cannot write the synthetic dataset cache there "
                         f"({e.strerror or e}); set data.root to a writable folder") from e
    try:
        for split in ("train", "val"):
            coco = _write_split(spec, split, tmp)
            (tmp / f"instances_{split}.json").write_text(json.dumps(coco))
        (tmp / "DONE").write_text(json.dumps(asdict(spec)))
        for _attempt in range(5):
            try:
                os.rename(tmp, folder)  # atomic; fails if another process's complete folder is already there
                break
            except OSError:
                if (folder / "DONE").exists():
                    log.info("%s was built meanwhile by another process; using it", folder)
                    break
                if folder.exists():
                    _move_aside(folder)
        else:
            raise OSError(f"could not move the built synthetic dataset {tmp} to {folder}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only there if another process won
    check_cache(folder, spec)
    return folder


def _move_aside(folder: Path) -> None:
    """Remove an incomplete folder (no ``DONE``) safely even if another process does the same."""
    try:
        os.rmdir(folder)  # empty: gone (a complete folder never is empty)
        return
    except FileNotFoundError:
        return  # another process moved it
    except OSError:
        pass
    trash = folder.with_name(f".{folder.name}.stale-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return
    except OSError:
        if (folder / "DONE").exists():
            return
        raise
    if (trash / "DONE").exists():  # a complete build took its place meanwhile: put it back
        try:
            os.rename(trash, folder)
            return
        except OSError:
            pass  # yet another complete one is there now
    shutil.rmtree(trash, ignore_errors=True)
