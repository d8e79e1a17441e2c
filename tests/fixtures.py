"""Tiny datasets written to disk in each real format (COCO JSON, Pascal VOC XML), for end-to-end tests.

Images are small (64-96 px, landscape and portrait) with one to three flat-coloured boxes on noise, so
a few training iterations on CPU take seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZES = ((96, 64), (64, 96))  # (width, height): landscape and portrait, for aspect-ratio grouping


def _image(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """An RGB image and its objects ``(class index 0/1, [x1, y1, x2, y2] integer pixels)``."""
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        cls = int(rng.integers(2))
        w, h = (int(v) for v in rng.integers(14, 30, 2))
        x1, y1 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        img[y1 : y1 + h, x1 : x1 + w] = (230, 40, 40) if cls == 0 else (40, 230, 40)
        objects.append((cls, [x1, y1, x1 + w, y1 + h]))
    return img, objects


def write_coco(folder: Path, num_train: int = 8, num_val: int = 4, seed: int = 0) -> dict[str, Path]:
    """``train.json``, ``val.json`` and ``images/``; category ids 3 and 7 (non-contiguous)."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    cats = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]
    paths, image_id, ann_id = {}, 1, 1
    for split, n in (("train", num_train), ("val", num_val)):
        images, anns = [], []
        for k in range(n):
            w, h = SIZES[k % 2]
            img, objects = _image(rng, w, h)
            name = f"{split}_{k}.png"
            Image.fromarray(img).save(folder / "images" / name)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
            for cls, (x1, y1, x2, y2) in objects:
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cats[cls]["id"],
                             "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                ann_id += 1
            image_id += 1
        paths[split] = folder / f"{split}.json"
        paths[split].write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": cats}))
    paths["images"] = folder / "images"
    return paths


def voc_xml(name: str, width: int, height: int, objects: list[tuple[str, list[float], int]]) -> str:
    """A VOC annotation; ``objects``: ``(class name, [xmin, ymin, xmax, ymax] 1-based, difficult)``."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated><difficult>{d}</difficult>"
        f"<bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b, d in objects)
    return (f"<annotation><folder>VOC2007</folder><filename>{name}.jpg</filename><size><width>{width}</width>"
            f"<height>{height}</height><depth>3</depth></size><segmented>0</segmented>{objs}</annotation>")


def write_voc(devkit: Path, num_trainval: int = 8, num_test: int = 4, seed: int = 1, year: str = "2007") -> Path:
    """``devkit/VOC{year}`` with Annotations, JPEGImages and ImageSets/Main/{trainval,test}.txt.

    Classes are ``cat`` and ``dog``; the last object of every third image is marked difficult.
    """
    rng = np.random.default_rng(seed)
    folder = devkit / f"VOC{year}"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    names = {"trainval": [], "test": []}
    k = 0
    for split, n in (("trainval", num_trainval), ("test", num_test)):
        for _ in range(n):
            k += 1
            name = f"{k:06d}"
            w, h = SIZES[k % 2]
            img, objects = _image(rng, w, h)
            Image.fromarray(img).save(folder / "JPEGImages" / f"{name}.jpg", quality=95)
            voc_objects = [("cat" if c == 0 else "dog", [x1 + 1, y1 + 1, x2, y2], 0) for c, (x1, y1, x2, y2) in objects]
            if k % 3 == 0:
                voc_objects[-1] = (*voc_objects[-1][:2], 1)
            (folder / "Annotations" / f"{name}.xml").write_text(voc_xml(name, w, h, voc_objects))
            names[split].append(name)
    for split, ids in names.items():
        (folder / "ImageSets" / "Main" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return folder
