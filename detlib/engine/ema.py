"""An exponential moving average of the weights, the model that is evaluated when ``trainer.ema_decay`` is set.

As torchvision's references (``ExponentialMovingAverage``) and timm's ``ModelEmaV2/V3``: a copy of the model
whose parameters follow the trained ones, after every optimizer step,

    ema = d_t * ema + (1 - d_t) * param,      d_t = min(decay, (1 + t) / (10 + t)),  t = updates so far (1, 2, ...)

and whose buffers (BatchNorm statistics, counters) are copied, not averaged. The warm-up ``(1 + t) / (10 + t)``
is TensorFlow's ``ExponentialMovingAverage(num_updates=...)`` (timm's ``ModelEmaV3`` has a similar one): a run
of 1000 iterations with decay 0.999 would otherwise keep 0.999^1000 = 37 % of its random initial weights.
The update is one ``torch._foreach_lerp_`` on the device, with a Python-float weight: no host sync.

Averaging the weights reduces the iteration-to-iteration noise of the evaluated model (the last SGD steps'
noise, and the learning-rate tail), a standard variance reducer for comparing runs; the raw weights stay
in the checkpoint beside the average (``state_dict``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(decay: float, updates: int) -> float:
    """The decay of the ``updates``-th update (1-based): ``min(decay, (1 + updates) / (10 + updates))``."""
    return min(decay, (1 + updates) / (10 + updates))


class ModelEMA:
    """``module``: the averaged copy of a model, in eval mode, without gradients. ``update(model)`` after each
    optimizer step; ``state_dict``/``load_state_dict`` for checkpoints (resume continues the same average)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay!r}")
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.updates = float(decay), 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model``'s weights (the unwrapped model, not a DDP wrapper)."""
        self.updates += 1
        d = ema_decay_at(self.decay, self.updates)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - d)
        for e, p in zip(self.module.buffers(), model.buffers()):
            e.copy_(p)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.module.load_state_dict(state["model"])
