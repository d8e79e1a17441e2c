"""Annotation checks run once at load time, before pycocotools or training sees the data.

Implements cases 1-10 of RELIABILITY.md on a raw COCO-format dict. Errors name the file, the
annotation id and the offending value; ``invalid="skip"`` drops what can be dropped, counts it and
names the first few offenders in the log. The returned dict is safe for pycocotools: every
annotation has ``area``, ``iscrowd``, a unique non-zero id, and a box clipped to its image.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)

SHOW = 5  # offenders named in the log per kind


class AnnotationError(ValueError):
    """A dataset file that cannot be used as it is; the message names file, field and value."""


def validate_coco(data: dict, path: str | Path, invalid: str = "error") -> tuple[dict, Counter]:
    """Check and repair a COCO-format dict; return the cleaned copy and counts of what was changed.

    Args:
        data: the parsed JSON (``images``, ``annotations``, ``categories``).
        path: the annotation file, for messages.
        invalid: ``error`` stops at a degenerate box; ``skip`` drops it and counts it.
    """
    if invalid not in ("error", "skip"):
        raise ValueError(f"data.invalid must be 'error' or 'skip', got {invalid!r}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise AnnotationError(f"{path}: field '{key}' is missing or not a list")
    data = copy.copy(data)
    counts: Counter = Counter()
    examples: dict[str, list[str]] = {}

    def note(kind: str, text: str) -> None:
        counts[kind] += 1
        if len(examples.setdefault(kind, [])) < SHOW:
            examples[kind].append(text)

    if "info" not in data:
        data["info"] = {}
        note("filled: info", "no 'info' section")
    cat_ids = {c["id"] for c in data["categories"]}
    images = {}
    for img in data["images"]:
        for field in ("id", "file_name", "width", "height"):
            if field not in img:
                raise AnnotationError(f"{path}: image {img.get('id', '?')} has no field '{field}'")
        if img["id"] in images:
            raise AnnotationError(f"{path}: duplicate image id {img['id']}")
        images[img["id"]] = img

    seen_ids: set = set()
    renumber = False
    clean = []
    for ann in data["annotations"]:
        ann = dict(ann)
        aid = ann.get("id")
        where = f"{path}: annotation id {aid}"
        if ann.get("image_id") not in images:
            raise AnnotationError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
        if ann.get("category_id") not in cat_ids:
            raise AnnotationError(
                f"{where}: category_id {ann.get('category_id')!r} is not in 'categories' {sorted(cat_ids)}")
        box = ann.get("bbox")
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise AnnotationError(f"{where}: field 'bbox' must be 4 numbers [x, y, w, h], got {box!r}")
        if not all(math.isfinite(v) for v in box):
            raise AnnotationError(f"{where}: field 'bbox' has a non-finite value {box!r}")
        x, y, w, h = box
        if w <= 0 or h <= 0:
            if invalid == "error":
                raise AnnotationError(
                    f"{where}: field 'bbox' has width or height <= 0: {box!r} (set data.invalid=skip to drop such boxes)")
            note("dropped: degenerate box", f"id {aid} bbox {box}")
            continue
        img = images[ann["image_id"]]
        x1, y1 = max(x, 0.0), max(y, 0.0)
        x2, y2 = min(x + w, float(img["width"])), min(y + h, float(img["height"]))
        if x2 <= x1 or y2 <= y1:
            note("dropped: box outside its image", f"id {aid} bbox {box} in {img['width']}x{img['height']}")
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            note("clipped: box partly outside its image", f"id {aid} bbox {box}")
            ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        if "area" not in ann:
            ann["area"] = (x2 - x1) * (y2 - y1)
            note("filled: area", f"id {aid}")
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
            note("filled: iscrowd", f"id {aid}")
        if not isinstance(aid, int) or aid <= 0 or aid in seen_ids:
            renumber = True  # pycocotools treats id 0 as "unmatched" and silently mis-scores duplicates
            note("renumbered: annotation id 0 or duplicate", f"id {aid!r}")
        seen_ids.add(aid)
        clean.append(ann)
    if renumber:
        for i, ann in enumerate(clean, start=1):
            ann["id"] = i
    data["annotations"] = clean
    for kind, n in sorted(counts.items()):
        level = logging.WARNING if not kind.startswith("filled") else logging.INFO
        log.log(level, "%s: %s: %d (first: %s)", path, kind, n, "; ".join(examples[kind]))
    filled = [k for k in counts if k.startswith("filled")]
    if filled:
        log.warning("%s: filled standard defaults for missing fields: %s", path, ", ".join(sorted(filled)))
    return data, counts
