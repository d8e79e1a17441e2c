"""COCO box evaluation backends: packages that give pycocotools' numbers, and how each one is driven.

``eval.backend`` (and ``tools/evaluate.py --backend``) names one of ``BACKENDS``:

* ``pycocotools``: the reference; every other backend is tested against it run directly
  (``tests/test_eval_parity.py``: crowd regions, > 100 detections per image, empty images, tied scores,
  custom ``eval.max_dets``, TIDE and the true positives' IoU).
* ``ultrafast_pycocotools``: Rust, pycocotools' own Python API; precision, recall and scores arrays
  bit-identical; its per-detection matches (``COCOeval.matches``) give the true positives' IoU natively.
* ``hotcoco``: Rust; arrays bit-identical; per-image matches only through ``evalImgs``, which takes
  tens of seconds to read back on COCO val's size (the true positives' IoU costs that; the 12 stats do not).
* ``faster_coco_eval``: C++; the 12 stats and arrays identical, but it keeps no per-image matches, so
  the true positives' IoU is left out (``None``) with it.
* ``auto`` (the default): the first installed of ``AUTO`` (fastest first, each passing every parity
  case), else ``pycocotools``. Which backend evaluated is recorded in ``eval_detail.json``
  (``eval_settings["eval.backend"]``); the backend is not part of a run's identity (the numbers are the same).

Each is given the ground truth as a pycocotools ``COCO`` and the detections as given (dicts) and as
``rows`` ``(N, 7)`` float64 ``[image_id, x, y, w, h, score, category_id]`` (pycocotools' ``loadRes``
array layout: ids 1..N in the given order, area ``w * h``), and returns its evaluator after
``evaluate()`` and ``accumulate()``: ``E.eval["precision"]`` ``(T, R, K, A, M)``, ``E.params``,
``E.cocoGt`` and ``E.cocoDt``, which everything in ``detlib.evaluation`` reads.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _dist_version
from typing import Any

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

REFERENCE = "pycocotools"
BACKENDS = ("auto", "pycocotools", "ultrafast_pycocotools", "hotcoco", "faster_coco_eval")
# Fastest first (whole-process ``tools/evaluate.py --gt --dt``, README "Speed"); only backends that pass every
# parity case, the true positives' IoU included (faster_coco_eval keeps no per-image matches).
AUTO = ("ultrafast_pycocotools", "hotcoco")
PACKAGES = {"pycocotools": "pycocotools", "ultrafast_pycocotools": "ultrafast-pycocotools", "hotcoco": "hotcoco",
            "faster_coco_eval": "faster-coco-eval"}  # backend (= module) -> distribution


def installed(backend: str) -> bool:
    """Can ``backend``'s package be imported here (without importing it)?"""
    return backend in PACKAGES and importlib.util.find_spec(backend) is not None


def resolve(backend: str) -> str:
    """The backend ``backend`` names: itself, or for ``auto`` the first installed of ``AUTO`` (else pycocotools)."""
    if backend not in BACKENDS:
        raise ValueError(f"eval.backend must be one of {'|'.join(BACKENDS)}, got {backend!r}")
    if backend != "auto":
        return backend
    return next((b for b in AUTO if installed(b)), REFERENCE)


def version(backend: str) -> str | None:
    """The installed version of ``backend``'s package (``auto`` resolved first), None if it is not installed."""
    try:
        return _dist_version(PACKAGES[resolve(backend)])
    except PackageNotFoundError:
        return None


def label(backend: str) -> str:
    """``backend`` (resolved) as its package and version, e.g. ``ultrafast-pycocotools 0.1.14``, for logs and reports."""
    name = resolve(backend)
    return f"{PACKAGES[name]} {version(name) or '(not installed)'}"


def _import(backend: str) -> Any:
    try:
        return importlib.import_module(backend)
    except ImportError as e:
        extra = "" if backend == "ultrafast_pycocotools" else " --extra fast-eval"
        raise ImportError(f"eval.backend={backend} needs the {PACKAGES[backend]} package: uv sync{extra} "
                          f"(or pip install {PACKAGES[backend]}), or use eval.backend=pycocotools") from e


def index(cls: type, dataset: dict) -> Any:
    """A ``cls`` (pycocotools' or faster-coco-eval's COCO) indexed over ``dataset``, quietly."""
    coco = cls()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def results_coco(gt: COCO, results: list[dict], cls: type = COCO) -> Any:
    """What ``gt.loadRes(results)`` builds for boxes, but also for an empty list."""
    anns = []
    for i, r in enumerate(results, start=1):
        x, y, w, h = r["bbox"]
        anns.append({**r, "id": i, "area": w * h, "iscrowd": 0})
    return index(cls, {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]),
                       "annotations": anns})


def _pycocotools(gt: COCO, results: list[dict], rows: np.ndarray) -> Any:
    return COCOeval(gt, results_coco(gt, results), iouType="bbox")


def _faster_coco_eval(gt: COCO, results: list[dict], rows: np.ndarray) -> Any:
    fce = _import("faster_coco_eval")
    g = index(fce.COCO, gt.dataset)
    return fce.COCOeval_faster(g, results_coco(g, results, fce.COCO), iouType="bbox")


def _ultrafast(gt: COCO, results: list[dict], rows: np.ndarray) -> Any:
    uf = _import("ultrafast_pycocotools")
    g = uf.COCO(gt.dataset, verbose=False)
    return uf.COCOeval(g, g.loadRes(rows), "bbox", print_function=lambda *_: None)


def _hotcoco(gt: COCO, results: list[dict], rows: np.ndarray) -> Any:
    hc = _import("hotcoco")
    g = hc.COCO(gt.dataset)
    return hc.COCOeval(g, g.loadRes(rows), "bbox")


_BUILD: dict[str, Callable[[COCO, list[dict], np.ndarray], Any]] = {
    "pycocotools": _pycocotools, "ultrafast_pycocotools": _ultrafast, "hotcoco": _hotcoco,
    "faster_coco_eval": _faster_coco_eval,
}


def evaluate(backend: str, gt: COCO, results: list[dict], rows: np.ndarray, max_dets: Sequence[int]) -> Any:
    """``backend``'s evaluator of ``results`` (and their ``rows``) on ``gt`` at ``max_dets``, evaluated and accumulated.

    ``results`` are scored in the order given (each backend's sort by score is stable, as pycocotools')."""
    with contextlib.redirect_stdout(io.StringIO()):  # their progress lines (ultrafast's loadRes prints too)
        E = _BUILD[resolve(backend)](gt, results, rows)
        E.params.maxDets = list(max_dets)
        E.evaluate()
        E.accumulate()
    return E


def backend_of(E: Any) -> str | None:
    """Which backend made the evaluator ``E`` (None: none of ours)."""
    for name, module, cls in (("pycocotools", "pycocotools.cocoeval", "COCOeval"),
                              ("ultrafast_pycocotools", "ultrafast_pycocotools", "COCOeval"),
                              ("hotcoco", "hotcoco", "COCOeval"), ("faster_coco_eval", "faster_coco_eval", "COCOeval_faster")):
        c = getattr(sys.modules.get(module), cls, None)  # only a module already imported can have made E
        if isinstance(c, type) and isinstance(E, c):
            return name
    return None
