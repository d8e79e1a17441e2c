"""Controlled annotation noise for robustness studies (``data.noise.jitter``, ``data.noise.outliers``).

The classic claim to test: L2 is hurt by outliers while L1, smooth L1 and Huber are not. Two kinds
of noise, applied once when the training split is built (never to val, never re-drawn per epoch),
deterministic from ``data.noise.seed``:

- jitter ``sigma``: every edge moves by ``N(0, sigma)`` times the box's width (x edges) or height
  (y edges);
- outliers ``p``: ``round(p * N)`` of the ``N`` training boxes, drawn without replacement, are
  replaced by a gross error: shifted by 1-2 box sizes, or scaled by 3 or by 1/3 about their centre.

Every corrupted box is clipped to its image and kept valid (at least 1 px wide and high); a gross
error also keeps IoU <= 0.5 with the original, so it is a real outlier even after clipping.
"""

from __future__ import annotations

import numpy as np

MIN_SIZE = 1.0  # px: a corrupted box narrower than this is not kept
MAX_OUTLIER_IOU = 0.5  # a gross error overlaps its original box at most this much


def box_iou_1to1(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of corresponding rows of ``a, b (N, 4)`` xyxy -> ``(N,)``."""
    lt, rb = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(1)
    union = (a[:, 2:] - a[:, :2]).prod(1) + (b[:, 2:] - b[:, :2]).prod(1) - inter
    return inter / np.maximum(union, 1e-12)


def _valid(box: np.ndarray) -> bool:
    return bool(box[2] - box[0] >= MIN_SIZE and box[3] - box[1] >= MIN_SIZE)


def _clip(box: np.ndarray, width: float, height: float) -> np.ndarray:
    return np.clip(box, 0, [width, height, width, height]).astype(np.float32)


def jitter_boxes(boxes: np.ndarray, sigma: float, width: float, height: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian edge jitter relative to box size; ``boxes (N, 4)`` float32 xyxy pixels.

    A box that the jitter would make invalid (edges crossed, or clipped away) keeps its original edges.
    """
    if sigma == 0 or len(boxes) == 0:
        return boxes.copy()
    wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)  # (N, 4): w, h, w, h
    out = _clip(boxes + rng.normal(0.0, sigma, boxes.shape) * wh, width, height)
    bad = ~((out[:, 2] - out[:, 0] >= MIN_SIZE) & (out[:, 3] - out[:, 1] >= MIN_SIZE))
    out[bad] = boxes[bad]
    return out


def gross_error(box: np.ndarray, width: float, height: float, rng: np.random.Generator) -> np.ndarray | None:
    """One far-off version of ``box (4,)`` xyxy: shifted by >= 1 box size or scaled x3 / /3, clipped.

    The kinds are tried in a random order; the first that stays valid and overlaps the original at
    most ``MAX_OUTLIER_IOU`` wins. ``None`` when none does (a box filling its whole image).
    """
    w, h = box[2] - box[0], box[3] - box[1]
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    # Shift towards the side with more room, by 1-2 box sizes along x, y or both.
    axes = [(1, 0), (0, 1), (1, 1)][rng.integers(3)]
    mx, my = rng.uniform(1.0, 2.0, 2)
    dx = axes[0] * mx * w * (1 if cx < width / 2 else -1)
    dy = axes[1] * my * h * (1 if cy < height / 2 else -1)
    candidates = {
        "shift": box + np.array([dx, dy, dx, dy], np.float32),
        "grow": np.array([cx - 1.5 * w, cy - 1.5 * h, cx + 1.5 * w, cy + 1.5 * h], np.float32),
        "shrink": np.array([cx - w / 6, cy - h / 6, cx + w / 6, cy + h / 6], np.float32),
    }
    names = list(candidates)
    for k in rng.permutation(len(names)):
        cand = _clip(candidates[names[k]], width, height)
        if _valid(cand) and box_iou_1to1(cand[None], box[None])[0] <= MAX_OUTLIER_IOU:
            return cand
    return None


def perturb_targets(
    targets: dict[int, tuple[np.ndarray, np.ndarray]],
    sizes: dict[int, tuple[float, float]],
    jitter: float = 0.0,
    outliers: float = 0.0,
    seed: int = 0,
) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], dict[str, float]]:
    """Noisy copy of ``targets`` (image id -> ``(boxes (N, 4) float32 xyxy, labels (N,))``) and its statistics.

    ``sizes``: image id -> ``(width, height)``. Images are visited in sorted id order, so the result
    depends only on the data and ``seed``. Statistics: ``boxes`` (count), ``outliers`` (boxes made
    gross errors), ``fraction_changed`` (boxes whose edges moved), ``mean_rel_shift`` (mean |edge
    shift| / box size over all boxes), ``mean_iou`` (mean IoU of noisy vs clean box).
    """
    if jitter < 0 or not 0 <= outliers <= 1:
        raise ValueError(f"data.noise: jitter must be >= 0 and outliers in [0, 1], got {jitter}, {outliers}")
    rng = np.random.default_rng([seed, 0x6E6F6973])  # 'nois': a stream of its own
    ids = sorted(targets)
    counts = [len(targets[i][0]) for i in ids]
    total = int(sum(counts))
    chosen = np.zeros(total, bool)
    chosen[rng.permutation(total)[: int(round(outliers * total))]] = True
    out, made, failed = {}, 0, 0
    for i, start in zip(ids, np.cumsum([0, *counts[:-1]])):
        boxes, labels = targets[i]
        w, h = sizes[i]
        noisy = jitter_boxes(boxes, jitter, w, h, rng)
        for j in np.where(chosen[start : start + len(boxes)])[0]:
            bad = gross_error(boxes[j], w, h, rng)
            if bad is None:
                failed += 1
            else:
                noisy[j], made = bad, made + 1
        out[i] = (noisy, labels)
    return out, noise_stats(targets, out, made, failed)


def noise_stats(
    clean: dict[int, tuple[np.ndarray, np.ndarray]],
    noisy: dict[int, tuple[np.ndarray, np.ndarray]],
    outliers: int = 0,
    failed: int = 0,
) -> dict[str, float]:
    """What a perturbation actually did, over all boxes (see ``perturb_targets``).

    ``outliers``: gross errors made; ``failed``: boxes drawn as outliers that had no valid far-off
    version (they keep their jittered edges).
    """
    a = np.concatenate([clean[i][0] for i in sorted(clean)] + [np.zeros((0, 4), np.float32)])
    b = np.concatenate([noisy[i][0] for i in sorted(clean)] + [np.zeros((0, 4), np.float32)])
    n = len(a)
    rel = np.abs(b - a) / np.tile(a[:, 2:] - a[:, :2], 2)
    return {
        "boxes": n,
        "outliers": outliers,
        "outlier_failures": failed,
        "outlier_fraction": outliers / n if n else 0.0,
        "fraction_changed": float((rel.max(1) > 0).mean()) if n else 0.0,
        "mean_rel_shift": float(rel.mean()) if n else 0.0,
        "mean_iou": float(box_iou_1to1(a, b).mean()) if n else 1.0,
    }
