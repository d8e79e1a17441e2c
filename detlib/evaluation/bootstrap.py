"""The val-sampling uncertainty of COCO AP: a bootstrap over val images, on pycocotools' own per-image matching.

A val set is a sample of images; another sample of the same size would give another AP, and another AP
difference between two models. The bootstrap draws that other sample: images with replacement, the same
draws for every model compared (a *paired* bootstrap: Efron & Tibshirani's resampling of test items, as
Koehn 2004 uses it to compare two systems on one test set), and recomputes AP from pycocotools' per-image
results:

* ``image_evaluations``: ``COCOeval.evaluate()`` once per model (area ``all``, the largest ``maxDets``): the
  per-image matches ``evalImgs``, ``[category][image]``, that AP is accumulated from;
* ``resampled_ap``: for image positions ``idx`` (repeats allowed), ``evalImgs`` laid out for those images and
  ``COCOeval.accumulate`` run on them, as if the val set were those images (a repeated image counts twice:
  its detections and its ground truth). ``idx = arange(n)`` gives the model's AP exactly.

Matching is per image, so it never changes between resamples: only the accumulation runs again (tens of
milliseconds), never ``evaluate()``.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detlib.evaluation.backends import results_coco
from detlib.evaluation.coco_eval import check_results

METRICS = ("AP", "AP50", "AP75")


def image_evaluations(gt: COCO, results: list[dict], max_det: int = 100) -> COCOeval:
    """pycocotools' per-image evaluation of COCO-format ``results`` on ``gt`` (area ``all``, ``max_det``
    detections per image), before accumulation."""
    check_results(gt, results)
    E = COCOeval(gt, results_coco(gt, results), iouType="bbox")
    E.params.areaRng, E.params.areaRngLbl, E.params.maxDets = [E.params.areaRng[0]], ["all"], [int(max_det)]
    with contextlib.redirect_stdout(io.StringIO()):
        E.evaluate()
    return E


def resampled_ap(E: COCOeval, idx: np.ndarray | None = None) -> dict[str, float | None]:
    """AP, AP50, AP75 of ``E`` (``image_evaluations``) on the val images at positions ``idx`` of
    ``E.params.imgIds`` (with repeats; None: all, once each): ``COCOeval.accumulate`` on those images."""
    images = E.params.imgIds
    idx = np.arange(len(images)) if idx is None else np.asarray(idx)
    n_img, n_cat = len(images), len(E.params.catIds)
    R = copy.copy(E)  # shares the per-image results; gets its own params and accumulation
    R.params = copy.copy(E._paramsEval)
    R.params.imgIds = list(range(len(idx)))  # the resampled images, each a new image
    R._paramsEval = R.params
    R.evalImgs = [E.evalImgs[k * n_img + int(i)] for k in range(n_cat) for i in idx]
    with contextlib.redirect_stdout(io.StringIO()):
        R.accumulate()
    prec = R.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    t50, t75 = (int(np.argmin(np.abs(R.params.iouThrs - v))) for v in (0.5, 0.75))

    def mean(x: np.ndarray) -> float | None:
        x = x[x > -1]
        return float(x.mean()) if x.size else None

    return {"AP": mean(prec), "AP50": mean(prec[t50]), "AP75": mean(prec[t75])}


def resamples(n_images: int, n_boot: int, seed: int = 0) -> np.ndarray:
    """``(n_boot, n_images)`` image positions drawn with replacement (seeded: a report is reproducible)."""
    return np.random.default_rng(seed).integers(0, n_images, (n_boot, n_images))


def bootstrap(evals: Sequence[COCOeval], n_boot: int = 1000, seed: int = 0,
              metric: str = "AP") -> np.ndarray:
    """``(n_boot, len(evals))``: ``metric`` of every model on the same resamples of the val images (paired).
    The models must have been evaluated on the same images (``image_evaluations`` on one ground truth).
    A resample where a model's metric is undefined (no ground truth drawn) is NaN."""
    if not evals:
        return np.zeros((n_boot, 0))
    ids = list(evals[0].params.imgIds)
    if any(list(E.params.imgIds) != ids or list(E.params.catIds) != list(evals[0].params.catIds) for E in evals):
        raise ValueError("bootstrap: the models were evaluated on different val images or categories")
    out = np.full((n_boot, len(evals)), np.nan)
    for b, idx in enumerate(resamples(len(ids), n_boot, seed)):
        for j, E in enumerate(evals):
            v = resampled_ap(E, idx)[metric]
            out[b, j] = np.nan if v is None else v
    return out


def percentile_ci(x: np.ndarray, confidence: float = 0.95) -> tuple[float, float]:
    """The percentile interval of bootstrap replicates ``x`` (NaNs left out)."""
    x = np.asarray(x, float)
    x = x[np.isfinite(x)]
    a = (1 - confidence) / 2
    return float(np.quantile(x, a)), float(np.quantile(x, 1 - a))
