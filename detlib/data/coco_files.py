"""COCO annotation files read into pycocotools, without torch (so ``tools/evaluate.py --gt --dt`` starts fast)."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

from pycocotools.coco import COCO

from detlib.data.validation import AnnotationError
from detlib.jsonio import read_json


def load_coco_json(path: str | Path) -> dict:
    """Read an annotation file, with errors that name it."""
    return read_json(path, "annotation file", AnnotationError)


def coco_from_dict(data: dict) -> COCO:
    """A pycocotools ``COCO`` built from a dict, without its chatter on stdout."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco
