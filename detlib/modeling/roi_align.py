"""RoIAlign as one weighted gather: every RoI's bilinear sampling points of every level read at once.

torchvision's CPU RoIAlign is a scalar loop over RoIs, bins, points and channels, and its backward
(``_roi_align_backward``) runs on one thread: on the small model it was 35 % of a bf16 training step.
Bilinear sampling and the mean over a bin's points are a weighted sum of at most ``4 * G * G'`` feature
vectors, so each output bin is one bag of ``F.embedding_bag(mode="sum", per_sample_weights=...)`` over the
feature maps laid out as rows of C channels (channels_last). Its CPU forward is vectorised over channels
and parallel over bins, and its backward (sorted indices, deterministic) is parallel too. All levels of
a multi-scale pooler share one table, so the whole pooling is one call, with no per-level scatter.

The points, validity rules and averaging are torchvision's (``roi_align_kernel.cpp``), so results equal
``torchvision.ops.roi_align`` to float rounding, forward and gradients (``tests/test_roi_align.py``):

- RoI ``(x1, y1, x2, y2) * spatial_scale`` (minus 0.5 with ``aligned``; without it, sides of at least one
  cell) is split into ``output_size`` bins of ``sampling_ratio x sampling_ratio`` points (``<= 0``:
  ``ceil(side / bins)`` points per bin, per RoI);
- a point outside ``[-1, H] x [-1, W]`` reads 0; inside, it is clamped onto the map and read bilinearly
  from its (up to) four neighbours; a bin is the mean of its points.

Precision: the table, the weights and the sums are float32 whatever the features' dtype, with autocast
off (bf16 coordinates would be 2-4 px off); the result has the first map's dtype, as torchvision's
pooler gives under autocast.

``MultiScaleRoIAlign`` is ``torchvision.ops.MultiScaleRoIAlign`` (same arguments, level mapping and scales
inferred from the first batch) with ``aligned`` and ``impl``: ``gather`` (this), ``torchvision`` (its
kernel) or ``auto``: ``gather`` on the CPU, torchvision's kernel on other devices (untested here) and
under ``torch.jit.trace`` (``detlib.export``: the traced op works at any input size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

IMPLS = ("auto", "gather", "torchvision")


def roi_align(input: Tensor, boxes: Tensor | list[Tensor], output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align``, as one weighted gather.

    ``input (N, C, H, W)`` any float dtype and memory format; ``boxes``: ``(K, 5)`` rows ``(image index, x1,
    y1, x2, y2)`` or a list of per-image ``(K_i, 4)`` xyxy, in the image's pixels (``spatial_scale`` maps
    them to cells). Returns ``(K, C, ph, pw)`` in ``input``'s dtype. Gradients flow to ``input`` only (the
    boxes are constants, as in torchvision's backward).
    """
    rois = boxes if isinstance(boxes, Tensor) else _convert_to_roi_format(boxes)
    levels = torch.zeros(rois.shape[0], dtype=torch.int64, device=rois.device)
    return multi_level_roi_align([input], rois, levels, [spatial_scale], output_size, sampling_ratio, aligned)


def multi_level_roi_align(features: list[Tensor], rois: Tensor, levels: Tensor, scales: list[float],
                          output_size: int | tuple[int, int], sampling_ratio: int, aligned: bool) -> Tensor:
    """RoIAlign of each RoI on its level: ``features`` ``(N, C, H_l, W_l)`` per level, ``rois (K, 5)`` as in
    ``roi_align``, ``levels (K,)`` int64 index into ``features``, ``scales`` per level. ``(K, C, ph, pw)``."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    n, c = features[0].shape[:2]
    k = rois.shape[0]
    with torch.autocast(features[0].device.type, enabled=False):
        # one table of C-channel rows: level l's cell (b, y, x) is row base_l + (b * H_l + y) * W_l + x
        table = torch.cat([f.float().permute(0, 2, 3, 1).reshape(-1, c) for f in features])
        if k == 0:
            return table[:0].view(0, c, 1, 1).expand(0, c, ph, pw).to(features[0].dtype)
        index, weight = _bags(rois.detach().float(), levels, [f.shape[-2:] for f in features], n, scales, ph, pw,
                              sampling_ratio, aligned)
        out = F.embedding_bag(index, table, per_sample_weights=weight, mode="sum")  # (K * ph * pw, C)
        out = out.view(k, ph, pw, c).permute(0, 3, 1, 2)
    return out.to(features[0].dtype, memory_format=torch.contiguous_format)


def _bags(rois: Tensor, levels: Tensor, sizes: list, n: int, scales: list[float], ph: int, pw: int,
          sampling_ratio: int, aligned: bool) -> tuple[Tensor, Tensor]:
    """Per output bin, the table rows and weights of its points' neighbours: ``(K * ph * pw, G * 2 * G' * 2)``
    int64 and float32. A weight is (bilinear weight) / (the RoI's points per bin); 0 for a point outside the
    map, beyond its RoI's adaptive grid, or a neighbour with no share."""
    dev = rois.device
    hs = torch.tensor([s[0] for s in sizes], device=dev)
    ws = torch.tensor([s[1] for s in sizes], device=dev)
    rows = hs * ws * n
    bases = torch.cumsum(rows, 0) - rows
    h, w = hs[levels], ws[levels]
    scale = torch.tensor(scales, device=dev, dtype=torch.float32)[levels]
    offset = 0.5 if aligned else 0.0
    x1, y1 = rois[:, 1] * scale - offset, rois[:, 2] * scale - offset
    rw, rh = rois[:, 3] * scale - offset - x1, rois[:, 4] * scale - offset - y1
    if not aligned:  # torchvision: force malformed RoIs to be 1x1
        rw, rh = rw.clamp(min=1.0), rh.clamp(min=1.0)
    bin_h, bin_w = rh / ph, rw / pw
    if sampling_ratio > 0:
        grid_h = grid_w = torch.full_like(rh, float(sampling_ratio))
    else:  # adaptive: ceil(side / bins) points per bin, per RoI (0 for an empty aligned RoI: its bins read 0)
        grid_h, grid_w = torch.ceil(bin_h), torch.ceil(bin_w)
    gh, gw = max(int(grid_h.max()), 1), max(int(grid_w.max()), 1)
    iy, wy = _axis(y1, bin_h, grid_h, ph, gh, h)
    ix, wx = _axis(x1, bin_w, grid_w, pw, gw, w)
    base = bases[levels] + rois[:, 0].long() * h * w
    e = (slice(None),) + (None,) * 6  # (K, 1, 1, 1, 1, 1, 1)
    # (K, ph, pw, G, 2, G', 2): bin (p, q), point (i, j), neighbour (low/high y, low/high x)
    index = base[e] + iy[:, :, None, :, :, None, None] * w[e] + ix[:, None, :, None, None, :, :]
    count = (grid_h * grid_w).clamp(min=1.0)
    weight = wy[:, :, None, :, :, None, None] * wx[:, None, :, None, None, :, :] / count[e]
    bins = rois.shape[0] * ph * pw
    return index.reshape(bins, -1), weight.reshape(bins, -1)


def _axis(start: Tensor, bin_size: Tensor, grid: Tensor, bins: int, g: int, size: Tensor) -> tuple[Tensor, Tensor]:
    """Along one axis, for ``(K, bins, g)`` points: the low and high neighbour cells ``(K, bins, g, 2)`` int64
    and their bilinear weights, 0 for a point that does not count (torchvision's ``bilinear_interpolate``)."""
    dev = start.device
    p = torch.arange(bins, device=dev, dtype=torch.float32)[None, :, None]
    i = torch.arange(g, device=dev, dtype=torch.float32)[None, None, :]
    b, gr, size = bin_size[:, None, None], grid[:, None, None], size[:, None, None].float()
    pos = start[:, None, None] + p * b + (i + 0.5) * b / gr.clamp(min=1.0)  # an empty grid: no NaN points
    ok = (i < gr) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = torch.minimum(pos.floor(), size - 1)
    frac = torch.where(low >= size - 1, 0.0, pos - low)  # on the last cell: no interpolation
    high = torch.minimum(low + 1, size - 1)
    return torch.stack([low, high], -1).long(), torch.stack([1 - frac, frac], -1) * ok[..., None]


class MultiScaleRoIAlign(torchvision.ops.MultiScaleRoIAlign):
    """``torchvision.ops.MultiScaleRoIAlign`` (FPN level mapping, scales inferred from the first batch) with
    ``aligned`` (half-pixel offset, detectron2's ``ROIAlignV2``; torchvision's pooler has it off) and ``impl``:
    ``gather`` (``multi_level_roi_align``), ``torchvision`` (its kernel) or ``auto`` (gather on the CPU)."""

    def __init__(self, featmap_names: list[str], output_size: int | tuple[int, int], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4, aligned: bool = False,
                 impl: str = "auto") -> None:
        super().__init__(featmap_names, output_size, sampling_ratio, canonical_scale=canonical_scale,
                         canonical_level=canonical_level)
        if impl not in IMPLS:
            raise ValueError(f"MultiScaleRoIAlign: impl must be one of {IMPLS}, got {impl!r}")
        self.aligned, self.impl = bool(aligned), impl

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        """``x``: feature maps by name; ``boxes``: per image ``(K_i, 4)`` float32 xyxy in the (resized) image's
        pixels; ``image_shapes``: the images' ``(H, W)``. Returns ``(sum K_i, C, ph, pw)`` in the first map's
        dtype."""
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        levels = self.map_levels(boxes) if len(feats) > 1 else torch.zeros(rois.shape[0], dtype=torch.int64,
                                                                             device=rois.device)
        # A trace (detlib.export) keeps torchvision's op: the gather's sizes would be baked in as constants.
        gather = self.impl == "gather" or (self.impl == "auto" and feats[0].device.type == "cpu")
        if gather and not torch.jit.is_tracing():
            return multi_level_roi_align(feats, rois, levels.long(), self.scales, self.output_size,
                                         self.sampling_ratio, self.aligned)
        result = feats[0].new_zeros((rois.shape[0], feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            result[idx] = torchvision.ops.roi_align(feat, rois[idx], self.output_size, scale, self.sampling_ratio,
                                                    self.aligned).to(result.dtype)
        return result

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, impl={self.impl!r})")
