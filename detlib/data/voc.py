"""Pascal VOC 2007/2012 read into the COCO format in memory, so one loader and one evaluation serve both.

Layout (``root`` is ``VOCdevkit/VOC2007`` itself, or ``VOCdevkit`` with ``year`` choosing the folder)::

    Annotations/{id}.xml   JPEGImages/{id}.jpg   ImageSets/Main/{train,val,trainval,test}.txt

Conversion:
- the 20 classes in VOC's order get category ids 1..20;
- VOC boxes are 1-based inclusive pixel indices; they become continuous xyxy
  ``[xmin - 1, ymin - 1, xmax, ymax]`` (as detectron2 does), so width = ``xmax - xmin + 1``;
- ``difficult`` objects get ``iscrowd = 1`` (and ``difficult = 1``): never training foregrounds,
  and pycocotools ignores detections that fall on them instead of counting misses or false
  positives. pycocotools matches crowd regions by intersection over the detection's area, a
  little more lenient than VOC's IoU; ``detlib.evaluation.voc_eval`` gives VOC's own AP50;
- image ids are the VOC ids as integers (``000005`` -> 5, ``2008_000008`` -> 2008000008), so
  a proposals file can name them; if that is not unique, the split's order 1..N is used instead.
"""

from __future__ import annotations

import logging
import math
import xml.etree.ElementTree as ET
from pathlib import Path

from detlib.data.validation import AnnotationError

log = logging.getLogger(__name__)

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)


def voc_folder(root: str | Path, year: str) -> Path:
    """``root`` itself if it holds ``Annotations/``, else ``root/VOC{year}``; an error naming both if neither."""
    root = Path(root).expanduser()
    for folder in (root, root / f"VOC{year}"):
        if (folder / "Annotations").is_dir():
            return folder
    raise FileNotFoundError(f"data=voc: no Annotations/ folder in {root} or {root / f'VOC{year}'}")


def read_split(folder: Path, split: str) -> list[str]:
    """The image ids listed in ``ImageSets/Main/{split}.txt``."""
    path = folder / "ImageSets" / "Main" / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"data=voc: split file not found: {path}")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _text(node: ET.Element, field: str, path: Path, where: str = "") -> str:
    child = node.find(field)
    if child is None or child.text is None or not child.text.strip():
        raise AnnotationError(f"{path}: {where}field '{field}' is missing or empty")
    return child.text.strip()


def _number(node: ET.Element, field: str, path: Path, where: str = "") -> float:
    text = _text(node, field, path, where)
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise AnnotationError(f"{path}: {where}field '{field}' is not a finite number: {text!r}")
    return value


def parse_voc_xml(path: Path, invalid: str = "error") -> dict:
    """One annotation file -> ``{"file_name", "width", "height", "objects": [{name, difficult, bbox xyxy}]}``.

    Errors name the file, the object (0-based index) and the field. A box with ``xmax < xmin`` or
    ``ymax < ymin`` is an error under ``invalid="error"``; under ``skip`` it is passed on for the
    COCO validation to drop and count.
    """
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise AnnotationError(f"{path}: not valid XML ({e})") from e
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read ({e})") from e
    size = root.find("size")
    if size is None:
        raise AnnotationError(f"{path}: field 'size' is missing")
    width, height = _number(size, "width", path, "size: "), _number(size, "height", path, "size: ")
    if width <= 0 or height <= 0:
        raise AnnotationError(f"{path}: field 'size' must be positive, got {width} x {height}")
    file_name = root.findtext("filename", default="").strip() or f"{path.stem}.jpg"
    objects = []
    for k, obj in enumerate(root.findall("object")):
        where = f"object {k}: "
        name = _text(obj, "name", path, where)
        if name not in VOC_CLASSES:
            raise AnnotationError(f"{path}: {where}field 'name' is not a VOC class: {name!r} (classes: "
                                  f"{', '.join(VOC_CLASSES)})")
        box_node = obj.find("bndbox")
        if box_node is None:
            raise AnnotationError(f"{path}: {where}field 'bndbox' is missing")
        x1, y1, x2, y2 = (_number(box_node, f, path, where + "bndbox: ") for f in ("xmin", "ymin", "xmax", "ymax"))
        if (x2 < x1 or y2 < y1) and invalid == "error":
            raise AnnotationError(f"{path}: {where}bndbox has xmax < xmin or ymax < ymin: "
                                  f"[{x1}, {y1}, {x2}, {y2}] (set data.invalid=skip to drop such boxes)")
        difficult = obj.findtext("difficult", default="0").strip() or "0"
        if difficult not in ("0", "1"):
            raise AnnotationError(f"{path}: {where}field 'difficult' must be 0 or 1, got {difficult!r}")
        objects.append({"name": name, "difficult": int(difficult), "bbox": [x1 - 1, y1 - 1, x2, y2]})
    return {"file_name": file_name, "width": int(width), "height": int(height), "objects": objects}


def _image_ids(names: list[str]) -> list[int]:
    """VOC ids as integers when that is unique, else 1..N in split order."""
    digits = [n.replace("_", "") for n in names]
    if not all(d.isdigit() for d in digits):
        return list(range(1, len(names) + 1))
    ids = [int(d) for d in digits]
    unique_nonzero = len(set(ids)) == len(ids) and 0 not in ids  # pycocotools needs ids > 0
    return ids if unique_nonzero else list(range(1, len(names) + 1))


def voc_to_coco(folder: Path, split: str, invalid: str = "error") -> dict:
    """One VOC split as a COCO-format dict (images, annotations, categories), for ``CocoDetection``."""
    names = read_split(folder, split)
    if not names:
        raise AnnotationError(f"{folder / 'ImageSets' / 'Main' / (split + '.txt')}: the split lists no images")
    images, annotations = [], []
    cat_of = {name: i + 1 for i, name in enumerate(VOC_CLASSES)}
    for image_id, name in zip(_image_ids(names), names):
        path = folder / "Annotations" / f"{name}.xml"
        if not path.is_file():
            raise AnnotationError(f"data=voc split {split}: annotation file not found: {path}")
        ann = parse_voc_xml(path, invalid)
        images.append({"id": image_id, "file_name": ann["file_name"], "width": ann["width"],
                       "height": ann["height"], "voc_id": name})
        for obj in ann["objects"]:
            x1, y1, x2, y2 = obj["bbox"]
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": cat_of[obj["name"]],
                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": max(x2 - x1, 0) * max(y2 - y1, 0),
                "iscrowd": obj["difficult"], "difficult": obj["difficult"]})
    categories = [{"id": i + 1, "name": n, "supercategory": "voc"} for i, n in enumerate(VOC_CLASSES)]
    n_diff = sum(a["difficult"] for a in annotations)
    log.info("VOC %s/%s: %d images, %d objects (%d difficult, ignored in evaluation)",
             folder.name, split, len(images), len(annotations), n_diff)
    return {"info": {"description": f"Pascal VOC {folder.name} {split}"}, "images": images,
            "annotations": annotations, "categories": categories}
