"""What a run is at an iteration: the training state and the metrics window, saved and restored whole.

``TrainState`` holds the model, optimizer, LR scheduler, grad scaler, the iteration, the
``MetricsWindow`` (loss terms accumulated since the last log step) and, with ``trainer.ema_decay``, the
``ModelEMA`` of the weights (the evaluated model). ``state_dict()`` is what a
checkpoint stores; ``load_state_dict()`` puts it back, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from detlib import distributed as dist
from detlib.config import TrainerConfig
from detlib.engine.ema import ModelEMA
from detlib.engine.optim import build_optimizer
from detlib.errors import CheckpointError

log = logging.getLogger(__name__)


def lr_lambda(cfg: TrainerConfig):
    """Linear warmup from ``warmup_factor``, then cosine to 0 or steps of ``gamma``."""
    milestones = [int(s * cfg.max_iters) for s in cfg.steps]

    def f(it: int) -> float:
        warm = 1.0
        if it < cfg.warmup_iters:
            a = it / cfg.warmup_iters
            warm = cfg.warmup_factor * (1 - a) + a
        if cfg.schedule == "cosine":
            return warm * 0.5 * (1 + math.cos(math.pi * min(it / cfg.max_iters, 1.0)))
        return warm * cfg.gamma ** sum(it >= m for m in milestones)

    return f


@dataclass
class MetricsWindow:
    """Loss terms summed on the device between log steps, read once per log period (the loop's only
    host sync), averaged over the window and over ranks."""

    accum: dict[str, Tensor] = field(default_factory=dict)
    count: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    it_start: int = 0

    def add(self, losses: dict[str, Tensor]) -> None:
        for k, v in losses.items():
            self.accum[k] = self.accum.get(k, 0) + v.detach().float()
        self.count += 1

    def flush(self) -> dict[str, Tensor]:
        """Means over the window and the ranks, as device tensors (every rank must call it)."""
        means = dist.mean_over_ranks({k: v / self.count for k, v in self.accum.items()})
        self.accum, self.count = {}, 0
        return means

    def rate(self, done: int) -> float:
        """Iterations per second since this process started training."""
        return (done - self.it_start) / max(time.perf_counter() - self.t_start, 1e-9)


@dataclass
class TrainState:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    iteration: int = 0
    window: MetricsWindow = field(default_factory=MetricsWindow)
    ema: ModelEMA | None = None  # the weights' moving average: what is evaluated, when set

    @classmethod
    def create(cls, model: nn.Module, cfg: TrainerConfig, device: torch.device, optimizer: Mapping) -> TrainState:
        """The optimizer the config's ``optimizer`` node names, on the trainable parameters
        (``detlib.engine.optim``: SGD with momentum by default), warmup + cosine/step LR, a scaler for fp16,
        the EMA of the weights with ``cfg.ema_decay`` (a copy of ``model`` as it is now, on its device)."""
        optimizer = build_optimizer(model, optimizer, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
        ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None
        return cls(model, optimizer, scheduler, scaler, ema=ema)

    @property
    def evaluated(self) -> nn.Module:
        """The model evaluations score: the EMA of the weights when there is one, else the model."""
        return self.model if self.ema is None else self.ema.module

    @property
    def params(self) -> list[nn.Parameter]:
        """The parameters the optimizer updates, of all its groups: what gradient clipping bounds."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def state_dict(self) -> dict:
        return dict(model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                    scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(), iteration=self.iteration,
                    log_accum={k: v.cpu() for k, v in self.window.accum.items()}, log_count=self.window.count) \
            | ({} if self.ema is None else {"ema": self.ema.state_dict()})

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if (self.ema is None) != ("ema" not in state):  # the run identity has trainer.ema_decay: never met
            raise CheckpointError("the checkpoint " + ("holds no" if self.ema else "holds an")
                                  + " EMA of the weights, this run " + ("has one" if self.ema else "has none"))
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.iteration = state["iteration"]
        self.window = MetricsWindow({k: v.to(device) for k, v in state["log_accum"].items()}, state["log_count"],
                                    it_start=self.iteration)
