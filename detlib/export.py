"""Export a trained detector for deployment as TorchScript, by tracing the inference path of one image.

    uv run tools/export.py --run RUN --out model.ts
    import torch, torchvision   # torchvision registers torchvision::nms and roi_align: load fails without it
    m = torch.jit.load("model.ts"); boxes, scores, labels = m(image)   # image: (3, H, W) float in [0, 1]

Tracing, not scripting: ``torch.jit.script`` refuses the model (dataclasses, dicts of tensors and Python
control flow in the heads). The trace keeps torchvision's ops (RoIAlign, NMS) and the data-dependent
shapes (how many proposals and detections survive), and any input size works (the resize is traced
from the input's shape); what it fixes is a batch of one image and the inference settings at export
time (score threshold, NMS, detections per image). ONNX export is not attempted here.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn


class SingleImage(nn.Module):
    """``forward(image (3, H, W)) -> (boxes (D, 4) xyxy, scores (D,), labels (D,))``: the traceable interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        det = self.model([image], None, detect=True)["detections"][0]
        return det["boxes"], det["scores"], det["labels"]


def export_torchscript(model: nn.Module, example: Tensor, path: str | Path) -> torch.jit.ScriptModule:
    """Trace ``model``'s inference on ``example (3, H, W)`` and save it to ``path``; returns the traced module."""
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape-to-int casts: checked by the tests
        traced = torch.jit.trace(SingleImage(model), (example,), check_trace=False)
    traced.save(str(path))
    return traced
