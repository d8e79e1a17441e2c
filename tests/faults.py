"""Losses that misbehave on purpose, chosen from the command line (``loss._target_=tests.faults...``)
so fault tests run the real ``train.py`` under ``torchrun``. Which rank and call: environment
variables, because the loss schema has no keys for them."""

from __future__ import annotations

import os

import torch

from detlib.losses import L1


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


class NaNOnRank(L1):
    """L1, but NaN on rank ``DETLIB_FAULT_RANK`` at call ``DETLIB_FAULT_CALL`` (1-based)."""

    calls = 0

    def forward(self, *args: torch.Tensor, **kwargs: str) -> torch.Tensor:
        NaNOnRank.calls += 1
        out = super().forward(*args, **kwargs)
        bad = _rank() == int(os.environ["DETLIB_FAULT_RANK"]) and self.calls == int(os.environ["DETLIB_FAULT_CALL"])
        return out * float("nan") if bad else out


class CrashOnce(L1):
    """L1, but the process on rank ``DETLIB_FAULT_RANK`` dies (os._exit) at call ``DETLIB_FAULT_CALL`` of
    torchrun's first attempt, as a killed worker would; restarted workers run normally."""

    calls = 0

    def forward(self, *args: torch.Tensor, **kwargs: str) -> torch.Tensor:
        CrashOnce.calls += 1
        if (os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and _rank() == int(os.environ["DETLIB_FAULT_RANK"])
                and self.calls == int(os.environ["DETLIB_FAULT_CALL"])):
            os._exit(17)
        return super().forward(*args, **kwargs)
