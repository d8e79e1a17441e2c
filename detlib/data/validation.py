"""Annotation checks run once at load time, before pycocotools or training sees the data.

Checks a raw COCO-format dict. Errors name the file, the
annotation id and the offending value; ``invalid="skip"`` drops what can be dropped, counts it and
names the first few offenders in the log.

One check gives two copies (``validate_coco_views``). The *evaluation* copy is the ground truth as
given, which pycocotools scores exactly as it would score the file: only the corrections it needs
to score correctly are made, each logged (a unique non-zero annotation id; ``area`` filled as
``w * h`` when missing, 0 or negative; ``iscrowd`` filled with 0). The *training* copy is the
same with boxes clipped to their image and boxes wholly outside dropped; evaluation never sees
that cleaning. What cannot be scored correctly is an error: a non-numeric or non-finite ``area``,
a duplicate category id, a degenerate box (``invalid="skip"`` drops it from both copies).

Field types are checked, never left to truthiness: ``iscrowd`` must be 0 or 1 (``true``/``false``
are converted, logged); the string ``"0"`` is an error, since pycocotools and training would take
any non-empty string as a crowd region. Scoring a file alone (``evaluation_ground_truth``, used by
``tools/evaluate.py --gt --dt``) asks only what pycocotools needs: images need an integer ``id``,
not ``file_name``, ``width`` or ``height``. Categories that share a name are kept apart by id
(``category_labels``: ``"car (id 3)"``), with a warning.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

SHOW = 5  # offenders named in the log per kind
CLIPPED, OUTSIDE = "clipped: box partly outside its image", "dropped: box outside its image"
TRAINING_ONLY = (CLIPPED, OUTSIDE)  # cleaning of the training copy; the evaluation copy keeps these boxes


class AnnotationError(ValueError):
    """A dataset file that cannot be used as it is; the message names file, field and value."""


def validate_coco(data: dict, path: str | Path, invalid: str = "error") -> tuple[dict, Counter]:
    """The training copy of a COCO-format dict (boxes clipped to their image) and counts of what was changed."""
    train, _, counts = validate_coco_views(data, path, invalid)
    return train, counts


def evaluation_ground_truth(data: dict, path: str | Path, invalid: str = "error") -> tuple[dict, Counter]:
    """The ground truth to score: the boxes as given, with only the logged corrections pycocotools needs.

    No image is read, so images need only an integer ``id`` (pycocotools scores boxes without
    ``file_name``, ``width`` or ``height``)."""
    _, gt, counts = validate_coco_views(data, path, invalid, log_training=False, images_on_disk=False)
    return gt, counts


def category_labels(categories: list[dict]) -> dict[int, str]:
    """Category id -> a name that tells it apart, in id order: its ``name``, or ``"name (id N)"`` where
    several ids share one. Per-class AP (logs, TensorBoard, ``eval_detail.json``) and drawings use it,
    so no class hides another."""
    counts = Counter(c["name"] for c in categories)
    return {c["id"]: c["name"] if counts[c["name"]] == 1 else f"{c['name']} (id {c['id']})"
            for c in sorted(categories, key=lambda c: c["id"])}


def _iscrowd(ann: dict, where: str, note) -> None:
    """``iscrowd`` as the integer 0 or 1: filled with 0 when missing, ``true``/``false`` converted; any other
    value (the string ``"0"``, 2, 0.5) is an error: pycocotools and training read it by truthiness."""
    v = ann.get("iscrowd")
    if "iscrowd" not in ann:
        ann["iscrowd"] = 0
        note("filled: iscrowd", f"id {ann.get('id')}")
    elif isinstance(v, bool):
        ann["iscrowd"] = int(v)
        note("converted: iscrowd true/false to 1/0", f"id {ann.get('id')} iscrowd {v!r}")
    elif not _is_int(v) or v not in (0, 1):
        why = " (a string: any non-empty one, \"0\" too, would make the box a crowd region)" if isinstance(v, str) else ""
        raise AnnotationError(f"{where}: field 'iscrowd' must be 0 or 1 (a JSON number), got {_show(v)}{why}")


def _area(ann: dict, where: str, note) -> None:
    """Fill a missing area, recompute one <= 0 (both as ``w * h``, what ``loadRes`` gives detections)."""
    _, _, w, h = ann["bbox"]
    if "area" not in ann:
        ann["area"] = w * h
        note("filled: area", f"id {ann.get('id')}")
        return
    area = ann["area"]
    if isinstance(area, bool) or not isinstance(area, (int, float)) or not math.isfinite(area):
        raise AnnotationError(f"{where}: field 'area' must be a finite number, got {_show(area)}")
    if area <= 0:  # pycocotools puts area 0 in "small" and ignores a negative area in every size range
        ann["area"] = w * h
        note("corrected: area <= 0 recomputed as bbox w * h", f"id {ann.get('id')} area {area!r} -> {w * h!r}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def check_structure(data: object, path: str | Path, images_on_disk: bool = True) -> None:
    """The JSON's shape, before any field is used, so a malformed file is an error naming the file,
    the entry, the field and the value (not a ``KeyError`` or ``TypeError`` later, or a crash at the
    final evaluation): a top-level object with lists ``images`` (integer ``id``; with ``images_on_disk``
    also a non-empty string ``file_name``, positive ``width`` and ``height``), ``annotations`` (integer
    ``image_id`` and ``category_id``) and a non-empty ``categories`` (integer ``id``, string ``name``)."""
    if not isinstance(data, dict):
        raise AnnotationError(f"{path}: the top level must be a JSON object with 'images', 'annotations' and "
                              f"'categories', got a {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: field '{key}' is missing or not a list")
        for k, entry in enumerate(data[key]):
            if not isinstance(entry, dict):
                raise AnnotationError(f"{path}: {key}[{k}] must be a JSON object, got {_show(entry)}")
    if not data["categories"]:
        raise AnnotationError(f"{path}: field 'categories' is empty: there is nothing to detect")
    for k, cat in enumerate(data["categories"]):
        if not _is_int(cat.get("id")):
            raise AnnotationError(f"{path}: categories[{k}]: field 'id' must be an integer, got {_show(cat.get('id'))}")
        if not isinstance(cat.get("name"), str):
            raise AnnotationError(f"{path}: category id {cat['id']}: field 'name' must be a string, "
                                  f"got {_show(cat.get('name'))}")
    for k, img in enumerate(data["images"]):
        if not _is_int(img.get("id")):
            raise AnnotationError(f"{path}: images[{k}]: field 'id' must be an integer, got {_show(img.get('id'))}"
                                  " (pycocotools and the evaluation need integer image ids)")
        where = f"{path}: image id {img['id']}"
        if not images_on_disk:
            continue  # scoring alone: pycocotools reads no image field but the id
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            raise AnnotationError(f"{where}: field 'file_name' must be a non-empty string, got "
                                  f"{_show(img.get('file_name'))}")
        for field in ("width", "height"):
            v = img.get(field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise AnnotationError(f"{where}: field '{field}' must be a positive number, got {_show(v)}")
    for k, ann in enumerate(data["annotations"]):
        for field in ("image_id", "category_id"):
            if not _is_int(ann.get(field)):
                raise AnnotationError(f"{path}: annotation id {_show(ann.get('id'))} (annotations[{k}]): field "
                                      f"'{field}' must be an integer, got {_show(ann.get(field))}")


class _Notes:
    """Counts of what validation changed, with the first few examples of each kind for the log."""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def __call__(self, kind: str, text: str) -> None:
        self.counts[kind] += 1
        if len(self.examples.setdefault(kind, [])) < SHOW:
            self.examples[kind].append(text)

    def log(self, path: str | Path, log_training: bool) -> None:
        for kind, n in sorted(self.counts.items()):
            if kind in TRAINING_ONLY:
                if log_training:
                    log.warning("%s: training boxes %s: %d (first: %s); evaluation scores them as given", path,
                                kind, n, "; ".join(self.examples[kind]))
                continue
            level = logging.WARNING if not kind.startswith("filled") else logging.INFO
            log.log(level, "%s: %s: %d (first: %s)", path, kind, n, "; ".join(self.examples[kind]))
        filled = [k for k in self.counts if k.startswith("filled")]
        if filled:
            log.warning("%s: filled standard defaults for missing fields: %s", path, ", ".join(sorted(filled)))


def _index(data: dict, path: str | Path, images_on_disk: bool = True) -> tuple[set, dict]:
    """``(category ids, images by id)``; duplicates and images missing a field are errors. Categories
    sharing a name are kept apart by id (``category_labels``), with a warning."""
    cat_ids: set = set()
    for cat in data["categories"]:
        if cat["id"] in cat_ids:  # pycocotools would evaluate that category twice
            raise AnnotationError(f"{path}: duplicate category id {cat['id']!r}")
        cat_ids.add(cat["id"])
    shared: dict[str, list] = {}
    for cat in data["categories"]:
        shared.setdefault(cat["name"], []).append(cat["id"])
    for name, ids in shared.items():
        if len(ids) > 1:
            log.warning("%s: categories %s share the name %r: they stay separate classes, keyed by id; per-class "
                        "results name them %s", path, ids, name,
                        ", ".join(repr(category_labels(data["categories"])[i]) for i in ids))
    images = {}
    for img in data["images"]:
        for field in ("id", "file_name", "width", "height") if images_on_disk else ("id",):
            if field not in img:
                raise AnnotationError(f"{path}: image {img.get('id', '?')} has no field '{field}'")
        if img["id"] in images:
            raise AnnotationError(f"{path}: duplicate image id {img['id']}")
        images[img["id"]] = img
    return cat_ids, images


def _checked_box(ann: dict, where: str, images: dict, cat_ids: set, invalid: str, note: _Notes) -> list | None:
    """The annotation's ``[x, y, w, h]``, or None when a degenerate box is skipped; errors name the entry."""
    if ann.get("image_id") not in images:
        raise AnnotationError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
    if ann.get("category_id") not in cat_ids:
        raise AnnotationError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories' "
                              f"{sorted(cat_ids)}")
    box = ann.get("bbox")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
        raise AnnotationError(f"{where}: field 'bbox' must be 4 numbers [x, y, w, h], got {box!r}")
    if not all(math.isfinite(v) for v in box):
        raise AnnotationError(f"{where}: field 'bbox' has a non-finite value {box!r}")
    if box[2] <= 0 or box[3] <= 0:
        if invalid == "error":
            raise AnnotationError(
                f"{where}: field 'bbox' has width or height <= 0: {box!r} (set data.invalid=skip to drop such boxes)")
        note("dropped: degenerate box", f"id {ann.get('id')} bbox {box}")
        return None
    return box


def _training_box(box: list, img: dict, aid: object, note: _Notes) -> list | None:
    """Training only: the box clipped to its image, None when wholly outside. Evaluation keeps ``box``."""
    x, y, w, h = box
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
    if x2 <= x1 or y2 <= y1:
        note(OUTSIDE, f"id {aid} bbox {box} in {img['width']}x{img['height']}")
        return None
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        note(CLIPPED, f"id {aid} bbox {box}")
        return [x1, y1, x2 - x1, y2 - y1]
    return box


def validate_coco_views(data: dict, path: str | Path, invalid: str = "error", log_training: bool = True,
                        images_on_disk: bool = True) -> tuple[dict, dict, Counter]:
    """Check a COCO-format dict once; return ``(training copy, evaluation copy, counts of what was changed)``.

    Args:
        data: the parsed JSON (``images``, ``annotations``, ``categories``).
        path: the annotation file, for messages.
        invalid: ``error`` stops at a degenerate box; ``skip`` drops it and counts it.
        log_training: also log the training-only cleaning (clipped and dropped boxes).
        images_on_disk: the images will be read (``file_name``, ``width``, ``height`` required); False
            when a file is only scored: the training copy then keeps the boxes unclipped.
    """
    if invalid not in ("error", "skip"):
        raise ValueError(f"data.invalid must be 'error' or 'skip', got {invalid!r}")
    check_structure(data, path, images_on_disk)
    data, note = copy.copy(data), _Notes()
    if "info" not in data:
        data["info"] = {}
        note("filled: info", "no 'info' section")
    cat_ids, images = _index(data, path, images_on_disk)
    seen_ids: set = set()
    renumber = False
    gt, train_boxes = [], []
    for ann in data["annotations"]:
        ann, aid = dict(ann), ann.get("id")
        where = f"{path}: annotation id {aid}"
        box = _checked_box(ann, where, images, cat_ids, invalid, note)
        if box is None:
            continue
        _area(ann, where, note)
        _iscrowd(ann, where, note)
        if not isinstance(aid, int) or aid <= 0 or aid in seen_ids:
            renumber = True  # pycocotools treats id 0 as "unmatched" and silently mis-scores duplicates
            note("renumbered: annotation id 0 or duplicate", f"id {aid!r}")
        seen_ids.add(aid)
        gt.append(ann)
        train_boxes.append(_training_box(box, images[ann["image_id"]], aid, note) if images_on_disk else box)
    if renumber:
        for i, ann in enumerate(gt, start=1):
            ann["id"] = i
    train = copy.copy(data)
    train["annotations"] = [ann if b is ann["bbox"] else {**ann, "bbox": b} for ann, b in zip(gt, train_boxes)
                            if b is not None]
    data["annotations"] = gt
    note.log(path, log_training)
    return train, data, note.counts
