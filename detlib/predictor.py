"""Run a trained model on images, as detectron2's ``DefaultPredictor`` and mmdetection's ``inference_detector``:

    from detlib import Predictor
    p = Predictor.from_run("outputs/2026-11-24/10-00-00")   # the run's config and checkpoints/last.pt
    dets = p("street.jpg")    # a path, PIL image, numpy (H, W, 3) array or (3, H, W) tensor

Arrays and tensors: uint8 0-255, uint16 0-65535 (any unsigned dtype: 0 to its maximum), signed integers 0-255,
floats 0-1; anything else is refused with the range found (``to_image_tensor``).

``dets``: ``boxes (D, 4)`` xyxy in the input image's pixels, ``scores (D,)``, ``labels (D,)`` (1..K-1),
``category_ids`` and ``names`` (from the run's dataset), sorted by score, on the CPU; boxes and scores are
float32 also when the model runs in the run's bf16 (``trainer.amp``; ``amp=`` to change it).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from detlib import runs
from detlib.data.image import _to_array, read_image
from detlib.device import autocast, autocast_dtype, resolve_device
from detlib.device import channels_last as to_channels_last
from detlib.engine.restore import load_run_config, load_weights, model_from_run, weights_note

log = logging.getLogger(__name__)

ImageLike = str | Path | Image.Image | np.ndarray | Tensor


def _scaled(image: Tensor) -> Tensor:
    """``image``'s values as float32 in [0, 1] by its dtype's convention (see ``to_image_tensor``)."""
    if image.dtype == torch.bool or image.is_complex():
        raise ValueError(f"image tensor of dtype {image.dtype}: expected an integer or float image")
    if image.is_floating_point():
        dtype, image = image.dtype, image.float()
        if image.numel() and not (torch.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
            raise ValueError(f"float image values must lie in [0, 1], got min {image.min().item():g}, max "
                             f"{image.max().item():g} ({dtype}); divide 8-bit values by 255, or pass the uint8 "
                             "array")
        return image
    info = torch.iinfo(image.dtype)
    if image.dtype == torch.uint8:
        return image.float().div(255)  # as the decoder does
    if info.min == 0:  # uint16, uint32, ...: 0 .. the dtype's maximum
        return (image.to(torch.float64) / info.max).float()
    low, high = (int(image.min()), int(image.max())) if image.numel() else (0, 0)
    if low < 0 or high > 255:  # a signed dtype has no pixel range of its own (int64 is what np.array(list) gives)
        raise ValueError(f"{image.dtype} image values must lie in [0, 255] (8-bit values), got min {low}, "
                         f"max {high}; pass 16-bit images as uint16 (scaled by 65535) or floats in [0, 1]")
    return image.float().div(255)


def to_image_tensor(image: ImageLike, exif_orientation: str = "apply") -> Tensor:
    """``(3, H, W)`` float32 RGB in [0, 1] from a path (detlib's decoder, with ``exif_orientation`` as in
    training), a PIL image (any mode the decoder takes; its pixels as they are), an ``(H, W, 3)`` array or a ``(3, H, W)`` tensor. Arrays and tensors are read by dtype: unsigned
    integers (uint8, uint16, ...) scale by the dtype's maximum (``/ 255``, ``/ 65535``); signed integers (int64
    from ``np.array`` of Python ints, int32, ...) must hold 8-bit values in [0, 255] and scale by 255; floats
    must lie in [0, 1]. Values outside those ranges raise ``ValueError`` naming the range found, rather than
    detecting nothing on a wrongly scaled image."""
    if isinstance(image, (str, Path)):
        return read_image(image, exif_orientation)
    if isinstance(image, Image.Image):
        image = _to_array(image)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an (H, W, 3) RGB array, got shape {image.shape}")
        if image.dtype.kind == "u" and image.dtype != np.uint8:  # torch's uint16/32/64 support few operations
            image = image.astype(np.float64) / np.iinfo(image.dtype).max
        image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
    if not isinstance(image, Tensor) or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected a path, PIL image, (H, W, 3) array or (3, H, W) tensor, got {type(image).__name__}"
                         + (f" of shape {tuple(image.shape)}" if hasattr(image, "shape") else ""))
    return _scaled(image)


class Predictor:
    """A model in eval mode on a device, with its class names; ``predictor(image) -> detections``."""

    def __init__(self, model: nn.Module, names: dict[int, str], label_to_cat: dict[int, int],
                 device: str | torch.device = "auto", exif_orientation: str = "apply", amp: str = "off",
                 channels_last: bool = False) -> None:
        """``exif_orientation``: how image files are read (the run's ``data.exif_orientation``); ``amp``: ``off |
        bf16 | fp16`` autocast of the forward pass (boxes, scores, RoIAlign and NMS stay float32);
        ``channels_last``: the backbone in channels_last memory format."""
        self.device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
        self.model = to_channels_last(model.to(self.device).eval(), channels_last)
        self.amp, self.amp_dtype = str(amp), autocast_dtype(amp)
        self.names, self.label_to_cat = names, label_to_cat
        self.exif_orientation = str(exif_orientation)
        self.weights = "model"  # which weights: ``model``, or ``ema`` (from_run of a run with trainer.ema_decay)

    @classmethod
    def from_run(cls, run_dir: str | Path, checkpoint: str | Path | None = None,
                 device: str | torch.device = "auto", weights: str = "auto", amp: str | None = None) -> Predictor:
        """The run's model (its ``run.json``: config and classes; no data is read, so a run folder copied
        without its data predicts) with ``checkpoint`` (default its last), in the run's ``trainer.amp``
        precision (``amp`` to change it) and ``trainer.channels_last`` layout; ``weights``: ``auto`` takes the
        EMA of the weights where the run kept one (what it evaluated), ``ema`` or ``model`` (see
        ``detlib.engine.restore.load_weights``); which was loaded is logged and kept in ``self.weights``."""
        cfg = load_run_config(run_dir)
        if cfg.model.get("proposals") is not None:
            raise ValueError(f"{run_dir}: a Fast R-CNN run reads proposals from a file by image id; it cannot "
                             "detect on new images (train a Faster R-CNN model, with an RPN)")
        model, names, label_to_cat = model_from_run(cfg, run_dir)
        state = load_weights(model, checkpoint or runs.last_checkpoint(run_dir), weights)
        log.info("%s: %s", run_dir, weights_note(state))
        trainer = cfg.get("trainer") or {}
        predictor = cls(model, names, label_to_cat, device, cfg.data.get("exif_orientation", "apply"),
                        str(trainer.get("amp", "off")) if amp is None else amp,
                        bool(trainer.get("channels_last", True)))
        predictor.weights = state["loaded"]
        return predictor

    @torch.no_grad()
    def __call__(self, image: ImageLike) -> dict:
        return self.predict([image])[0]

    @torch.no_grad()
    def predict(self, images: list[ImageLike]) -> list[dict]:
        """Detections of each image (one batch)."""
        tensors = [to_image_tensor(im, self.exif_orientation).to(self.device) for im in images]
        with autocast(self.device, self.amp_dtype):
            out = self.model(tensors, None, detect=True)["detections"]
        results = []
        for det in out:
            det = {k: v.cpu() for k, v in det.items()}
            labels = det["labels"].tolist()
            det["category_ids"] = [self.label_to_cat[c] for c in labels]
            det["names"] = [self.names[c] for c in labels]
            results.append(det)
        return results
