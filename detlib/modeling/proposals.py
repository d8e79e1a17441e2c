"""Proposal sources for Fast R-CNN mode (``model=fast_rcnn``): RoIs without an RPN.

A source is called as ``source(targets, original_sizes, image_sizes) -> list of (P, 4)`` xyxy boxes in
the *resized* image's pixels (what the model's transform made), one tensor per image. ``targets``
are the transformed targets: ``boxes`` already resized, ``image_id``, and from the training
sampler ``hflip`` and ``aug_seed``.

- ``FileProposals``: precomputed boxes per image id (selective search, EdgeBoxes, another model's
  RPN), in JSON, ``.npz`` or pickle, as Fast R-CNN and detectron2 use them; top-k per image by score.
  Reading a file never runs code: ``.npz`` is read without pickle, and a pickle (``.pkl``/``.pickle``)
  through an unpickler that builds only numbers, strings, containers and plain numpy arrays and
  refuses any other object.
- ``GTJitterProposals``: jittered ground truth plus random background boxes, for quick loss studies
  without an RPN; deterministic per (seed, image, iteration).
"""

from __future__ import annotations

import codecs
import collections
import io
import json
import math
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import clip_boxes_to_image


class ProposalError(ValueError):
    """A proposals file that cannot be used; the message names the file, the image id and the value."""


def _globals() -> dict[tuple[str, str], object]:
    """The only globals a proposals pickle may name: containers and what numpy pickles arrays with.

    Nothing here can run code: each builds plain data from plain data (numpy's helpers rebuild an
    ndarray, a dtype or a scalar from bytes). Names from Python 2 and numpy 1.x pickles are mapped too.
    """
    core = np._core if hasattr(np, "_core") else np.core
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("_codecs", "encode"): codecs.encode,  # bytes in protocol-2 pickles
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for builtins in ("builtins", "__builtin__"):
        for name, obj in (("set", set), ("frozenset", frozenset), ("bytes", bytes), ("bytearray", bytearray),
                          ("complex", complex), ("list", list), ("dict", dict), ("tuple", tuple)):
            allowed[builtins, name] = obj
    for package in ("numpy._core", "numpy.core"):
        allowed[f"{package}.multiarray", "_reconstruct"] = core.multiarray._reconstruct
        allowed[f"{package}.multiarray", "scalar"] = core.multiarray.scalar
        allowed[f"{package}.numeric", "_frombuffer"] = core.numeric._frombuffer
    return allowed


class _PlainDataUnpickler(pickle.Unpickler):
    """A pickle reader that refuses every global outside ``_globals()`` (so no function is ever called
    that the file chose): detectron2's proposal pickles (dicts and lists of numpy arrays) load, a
    crafted file raises ``ProposalError`` naming the file and the refused global."""

    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # as detectron2 reads them (numpy arrays from Python 2)
        self.path = path
        self.allowed = _globals()

    def find_class(self, module: str, name: str) -> object:
        obj = self.allowed.get((module, name))
        if obj is None:
            raise ProposalError(
                f"{self.path}: refused to load {module}.{name}: a proposals pickle may hold only numbers, strings, "
                "lists, dicts and numpy arrays, and detlib never runs code from a proposals file "
                "(write the proposals as JSON or .npz to avoid pickle altogether)")
        return obj

    def persistent_load(self, pid: object) -> object:
        raise ProposalError(f"{self.path}: refused to load a persistent id from a proposals pickle")


def _read_npz(path: Path) -> dict:
    """An ``.npz`` (read without pickle) as the mapping ``_records`` takes.

    detectron2's keys: ``ids (N,)``, ``boxes`` and optional ``objectness_logits`` or ``scores``, and
    ``bbox_mode``; the boxes either ``(N, K, 4)`` with scores ``(N, K)``, or all images' boxes
    concatenated ``(M, 4)`` with ``counts (N,)`` boxes per image and scores ``(M,)``. Without ``ids``:
    one array of boxes per image id, ``np.savez(f, **{"17": boxes, ...})``.
    """
    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    if "ids" not in data or "boxes" not in data:
        return data
    ids = data["ids"].reshape(-1)
    out: dict = {"ids": ids.tolist()}
    if "bbox_mode" in data:
        out["bbox_mode"] = data["bbox_mode"].reshape(-1)[0]
    score_key = "scores" if "scores" in data else "objectness_logits" if "objectness_logits" in data else None
    boxes, scores = data["boxes"], data.get(score_key) if score_key else None
    if "counts" in data:
        counts = data["counts"].reshape(-1)
        if (counts.shape[0] != ids.shape[0] or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any()
                or int(counts.sum()) != boxes.shape[0]):
            raise ProposalError(f"{path}: 'counts' must be {ids.shape[0]} non-negative integers summing to the "
                                f"{boxes.shape[0]} rows of 'boxes', got {counts.tolist()[:10]}")
        cuts = np.cumsum(counts)[:-1]
        out["boxes"] = np.split(boxes, cuts)
        if scores is not None:
            if scores.shape[0] != boxes.shape[0]:
                raise ProposalError(f"{path}: '{score_key}' must have one value per row of 'boxes' "
                                    f"({boxes.shape[0]}), got shape {scores.shape}")
            out[score_key] = np.split(scores, cuts)
        return out
    if boxes.ndim != 3 or boxes.shape[0] != ids.shape[0]:
        raise ProposalError(f"{path}: 'boxes' must be (N, K, 4) for {ids.shape[0]} ids, or (M, 4) with 'counts', "
                            f"got shape {boxes.shape}")
    out["boxes"] = list(boxes)
    if scores is not None:
        if scores.shape[:2] != boxes.shape[:2]:
            raise ProposalError(f"{path}: '{score_key}' must have shape {boxes.shape[:2]}, got {scores.shape}")
        out[score_key] = list(scores)
    return out


SUFFIXES = (".json", ".npz", ".pkl", ".pickle")


def _read(path: Path) -> object:
    """JSON, ``.npz`` (no pickle) or a pickle through ``_PlainDataUnpickler``; never runs code from the file."""
    if not path.is_file():
        raise FileNotFoundError(f"model.proposals.file: file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ProposalError(f"{path}: unknown proposals format '{path.suffix}'; use {', '.join(SUFFIXES)}")
    try:
        if suffix == ".json":
            return json.loads(path.read_text())
        if suffix == ".npz":
            return _read_npz(path)
        with path.open("rb") as f:
            return _PlainDataUnpickler(f, path).load()
    except ProposalError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoding failure is the same user error
        raise ProposalError(f"{path}: cannot read proposals ({type(e).__name__}: {e})") from e


def _records(data: object, path: Path) -> list[tuple[object, object, object]]:
    """``(image id, boxes, scores or None)`` from any of the accepted layouts:

    - detectron2's ``{"ids": [...], "boxes": [...], "objectness_logits" or "scores": [...],
      "bbox_mode": 0 (xyxy) | 1 (xywh)}``;
    - ``{image_id: boxes}`` or ``{image_id: {"boxes": ..., "scores": ...}}``;
    - ``[{"image_id": ..., "boxes": ..., "scores": ...}, ...]``.
    """
    if isinstance(data, dict) and "ids" in data and "boxes" in data:
        scores = data.get("scores", data.get("objectness_logits"))
        mode = int(data.get("bbox_mode", 0))
        if mode not in (0, 1):
            raise ProposalError(f"{path}: bbox_mode must be 0 (XYXY_ABS) or 1 (XYWH_ABS), got {mode}")
        out = []
        for k, (i, b) in enumerate(zip(data["ids"], data["boxes"])):
            b = np.asarray(b, np.float64)
            if mode == 1 and b.ndim == 2 and b.shape[1] == 4:
                b = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)
            out.append((i, b, None if scores is None else scores[k]))
        return out
    if isinstance(data, dict):
        return [(i, v.get("boxes"), v.get("scores")) if isinstance(v, dict) else (i, v, None) for i, v in data.items()]
    if isinstance(data, list) and all(isinstance(r, dict) and "image_id" in r for r in data):
        return [(r["image_id"], r.get("boxes"), r.get("scores")) for r in data]
    raise ProposalError(f"{path}: unknown layout {type(data).__name__}; expected {{image_id: boxes}}, "
                        "detectron2's {'ids', 'boxes', ...} or a list of {'image_id', 'boxes', 'scores'}")


def _image_id(key: object, path: Path) -> int:
    try:
        return int(key)
    except (TypeError, ValueError):
        raise ProposalError(f"{path}: image id {key!r} is not an integer") from None


def _check(image_id: int, boxes: object, scores: object, path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Boxes ``(N, 4)`` float32 xyxy, finite, x2 >= x1 and y2 >= y1; scores ``(N,)`` or None."""
    where = f"{path}: image id {image_id}"
    try:
        b = np.asarray(boxes if boxes is not None else [], np.float64)
    except (TypeError, ValueError) as e:
        raise ProposalError(f"{where}: boxes are not numbers ({e})") from e
    b = b.reshape(0, 4) if b.size == 0 else b
    if b.ndim != 2 or b.shape[1] != 4:
        raise ProposalError(f"{where}: boxes must have shape (N, 4), got {b.shape}")
    if not np.isfinite(b).all():
        raise ProposalError(f"{where}: non-finite box {b[~np.isfinite(b).all(1)][0].tolist()}")
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if bad.any():
        raise ProposalError(f"{where}: box {b[bad][0].tolist()} has x2 < x1 or y2 < y1 (boxes must be xyxy)")
    if scores is None:
        return b.astype(np.float32), None
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.shape[0] != b.shape[0] or not np.isfinite(s).all():
        raise ProposalError(f"{where}: scores must be {b.shape[0]} finite numbers, got shape {s.shape}")
    return b.astype(np.float32), s


class FileProposals(nn.Module):
    """Precomputed proposals, per image id, in the original image's absolute pixels (xyxy).

    ``top_k``: the k highest-scoring boxes per image are kept (the first k in file order when the
    file has no scores). The boxes follow the sampler's horizontal flip and the model's resize.
    They are not part of the state dict.
    """

    def __init__(self, file: str, top_k: int = 2000) -> None:
        super().__init__()
        if top_k < 1:
            raise ValueError(f"model.proposals.top_k must be >= 1, got {top_k}")
        self.path = Path(file).expanduser()
        self.top_k = top_k
        self.boxes: dict[int, Tensor] = {}
        for key, boxes, scores in _records(_read(self.path), self.path):
            image_id = _image_id(key, self.path)
            if image_id in self.boxes:
                raise ProposalError(f"{self.path}: image id {image_id} appears twice")
            b, s = _check(image_id, boxes, scores, self.path)
            order = np.arange(len(b)) if s is None else np.argsort(-s, kind="stable")
            self.boxes[image_id] = torch.from_numpy(b[order[:top_k]].copy())

    def check_ids(self, ids: Iterable[int], split: str) -> None:
        """Every image of a split needs proposals; the error names the file and the missing ids."""
        missing = sorted(set(ids) - set(self.boxes))
        if missing:
            raise ProposalError(f"{self.path}: no proposals for {len(missing)} {split} image ids, first: {missing[:10]}")

    def forward(
        self, targets: list[dict], original_sizes: list[tuple[int, int]], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        out = []
        for t, (h, w), size in zip(targets, original_sizes, image_sizes):
            image_id = int(t["image_id"])
            if image_id not in self.boxes:
                raise ProposalError(f"{self.path}: no proposals for image id {image_id}")
            b = self.boxes[image_id].to(t["boxes"].device)
            if t.get("hflip", False):
                b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
            out.append(clip_boxes_to_image(resize_boxes(b, (h, w), size), size))
        return out

    def extra_repr(self) -> str:
        return f"file={self.path}, top_k={self.top_k}, images={len(self.boxes)}"


def _generator(seed: int, image_id: int, aug_seed: int | None) -> torch.Generator:
    """One stream per (seed, image, iteration): ``aug_seed`` comes from the training sampler, which
    derives it from the run's seed and the iteration; evaluation (no aug_seed) gets fixed boxes."""
    mixed = ((seed * 1_000_003 + image_id) * 1_000_033 + (0 if aug_seed is None else aug_seed + 1)) % (2**63)
    return torch.Generator().manual_seed(mixed)


class GTJitterProposals(nn.Module):
    """Jittered ground truth plus random background boxes: RoIs for loss studies without an RPN.

    Per image: ``per_gt`` copies of each GT box whose edges move by ``N(0, jitter)`` times the box's
    width or height (a spread of IoUs around the 0.5 foreground threshold), plus ``num_background``
    boxes with log-uniform side in ``[min_size, min(H, W)]``, aspect ratio in [1/2, 2] and uniform
    centre. All clipped to the image; boxes under 1 px dropped. Nothing learnable.
    """

    def __init__(self, per_gt: int = 16, jitter: float = 0.15, num_background: int = 64, min_size: float = 8.0,
                 seed: int = 0) -> None:
        super().__init__()
        if per_gt < 0 or jitter < 0 or num_background < 0 or min_size <= 0:
            raise ValueError(f"model.proposals: per_gt, jitter, num_background must be >= 0 and min_size > 0, got "
                             f"{per_gt}, {jitter}, {num_background}, {min_size}")
        self.per_gt, self.jitter, self.num_background = per_gt, jitter, num_background
        self.min_size, self.seed = min_size, seed

    def one_image(self, gt: Tensor, size: tuple[int, int], g: torch.Generator) -> Tensor:
        """``gt (G, 4)`` xyxy in the resized image -> proposals ``(P, 4)`` xyxy, on CPU."""
        h, w = size
        gt = gt.detach().float().cpu().reshape(-1, 4)
        rep = gt.repeat_interleave(self.per_gt, dim=0)
        wh = (rep[:, 2:] - rep[:, :2]).repeat(1, 2)
        jittered = rep + torch.randn(rep.shape, generator=g) * self.jitter * wh
        n = self.num_background
        hi = max(min(h, w), self.min_size)
        side = torch.exp(torch.empty(n).uniform_(math.log(self.min_size), math.log(hi), generator=g))
        aspect = torch.exp(torch.empty(n).uniform_(math.log(0.5), math.log(2.0), generator=g))
        bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
        cx, cy = torch.rand(n, generator=g) * w, torch.rand(n, generator=g) * h
        background = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
        boxes = clip_boxes_to_image(torch.cat([jittered, background]), size)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        return boxes[keep]

    def forward(
        self, targets: list[dict], original_sizes: list[tuple[int, int]], image_sizes: list[tuple[int, int]]
    ) -> list[Tensor]:
        out = []
        for t, size in zip(targets, image_sizes):
            g = _generator(self.seed, int(t["image_id"]), t.get("aug_seed"))
            out.append(self.one_image(t["boxes"], size, g).to(t["boxes"].device))
        return out

    def extra_repr(self) -> str:
        return (f"per_gt={self.per_gt}, jitter={self.jitter}, num_background={self.num_background}, "
                f"min_size={self.min_size}, seed={self.seed}")


def build_proposal_source(
    source: str | None = None,
    file: str | None = None,
    top_k: int = 2000,
    per_gt: int = 16,
    jitter: float = 0.15,
    num_background: int = 64,
    min_size: float = 8.0,
    seed: int = 0,
) -> nn.Module:
    """``model.proposals``: ``source=file`` (or just ``file=PATH``) or ``source=gt_jitter`` (the default without a file)."""
    source = source or ("file" if file else "gt_jitter")
    if source == "file":
        if not file:
            raise ValueError("model.proposals.source=file needs model.proposals.file=PATH")
        return FileProposals(file, top_k)
    if source == "gt_jitter":
        if file:
            raise ValueError(f"model.proposals.source=gt_jitter but model.proposals.file={file} is also set")
        return GTJitterProposals(per_gt, jitter, num_background, min_size, seed)
    raise ValueError(f"model.proposals.source must be file|gt_jitter, got {source!r}")


def check_proposal_ids(model: nn.Module, **splits: Iterable[int]) -> None:
    """Before training: a file source must cover every image of every split (no-op otherwise)."""
    source = getattr(model, "proposals", None)
    if isinstance(source, FileProposals):
        for split, ids in splits.items():
            source.check_ids(ids, split)
