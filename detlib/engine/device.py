"""Where tensors run: the device a config names, the autocast precision, and moving a batch there.

One place for what the trainer, evaluation and the tools (``detlib.tools``) all do.
"""

from __future__ import annotations

import torch

from detlib import distributed as dist

AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when present. Under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"config: trainer.device={name} but CUDA is not available (use trainer.device=auto or cpu)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and dist.world_size() > 1:
        return torch.device("cuda", dist.local_rank())
    return torch.device(name)


def autocast_dtype(amp: str) -> torch.dtype | None:
    """``trainer.amp`` (``off | bf16 | fp16``) -> the autocast dtype; None: full precision."""
    try:
        return AMP_DTYPES[str(amp)]
    except KeyError:
        raise ValueError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}") from None


def autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """``torch.autocast`` to ``dtype`` on ``device``; disabled (full precision) when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def to_device(device: torch.device, images: list, targets: list) -> tuple[list, list]:
    """A batch (images, target dicts) on ``device``; non-tensor target fields (``image_id``) stay as they are."""
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets
