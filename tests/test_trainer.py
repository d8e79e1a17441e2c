"""The training loop's guards and resume logic, in-process on the smoke data (RELIABILITY 5, 16, 18, 20-23)."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detlib.data.build import build_datasets
from detlib.engine import checkpoint
from detlib.engine.trainer import NonFiniteLossError, optimizer_step, train
from detlib.losses import L1

from .conftest import compose_cfg


@pytest.fixture(scope="module")
def parts(data_root):
    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.progress=false")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    return cfg, typed, train_set, val_set


def _model(cfg, num_classes, box_loss=None):
    torch.manual_seed(0)
    return instantiate(cfg.model, num_classes=num_classes, box_loss=box_loss or instantiate(cfg.loss),
                       rpn_box_loss=instantiate(cfg.rpn_loss))


class NaNOnCall(L1):
    """An L1 loss that returns NaN on the listed calls (1-based), to test the guard."""

    def __init__(self, bad: set[int]):
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, input, target, reduction="sum"):
        self.calls += 1
        out = super().forward(input, target, reduction)
        return out * float("nan") if self.calls in self.bad else out


def _run(parts, run_dir, model=None, meta=None, **trainer):
    cfg, typed, train_set, val_set = parts
    tcfg = dataclasses.replace(typed.trainer, **trainer)
    model = model or _model(cfg, train_set.num_classes)
    return train(model, train_set, val_set, tcfg, typed.eval, run_dir, typed.data.batch_size, 0, typed.seed,
                 meta or {"seed": typed.seed})


def test_case16_nonfinite_loss_stops_naming_iteration_terms_and_images(parts, tmp_path):
    cfg, _, train_set, _ = parts
    model = _model(cfg, train_set.num_classes, NaNOnCall({3}))
    with pytest.raises(NonFiniteLossError) as e:
        _run(parts, tmp_path, model, max_iters=6, checkpoint_period=1)
    msg = str(e.value)
    assert "iteration 3" in msg and "loss_box_reg=nan" in msg and "loss_cls=" in msg
    assert "image ids [" in msg and ".png" in msg
    dump = torch.load(tmp_path / "nonfinite_iter0000003.pt", weights_only=False)
    assert dump["iteration"] == 3 and dump["proposals"] is not None and dump["deltas"] is not None
    assert len(dump["targets"]) == len(dump["image_ids"])
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["last.pt", "model_0000001.pt", "model_0000002.pt"]  # nothing after the bad step
    assert not (tmp_path / "metrics.json").exists()


def test_case16_skip_mode_skips_counts_and_stops_after_m_in_a_row(parts, tmp_path, caplog):
    cfg, _, train_set, _ = parts
    model = _model(cfg, train_set.num_classes, NaNOnCall({2}))
    with caplog.at_level(logging.WARNING):
        stats = _run(parts, tmp_path / "a", model, max_iters=4, on_nonfinite="skip", max_nonfinite=2)
    assert "skipping step" in caplog.text and "iteration 2" in caplog.text and stats["AP"] is not None
    model = _model(cfg, train_set.num_classes, NaNOnCall({2, 3}))
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        _run(parts, tmp_path / "b", model, max_iters=6, on_nonfinite="skip", max_nonfinite=2)


def test_case5_batch_without_foreground_gives_every_parameter_a_gradient(parts):
    cfg, _, train_set, _ = parts
    for loss in ("smooth_l1", "giou"):
        c = compose_cfg(f"loss={loss}")
        model = _model(cfg, train_set.num_classes, instantiate(c.loss))
        images = [torch.rand(3, 128, 128), torch.rand(3, 128, 128)]
        empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
        out = model(images, [empty, dict(empty)])
        loss_sum = sum(out["losses"].values())
        assert torch.isfinite(loss_sum)
        loss_sum.backward()
        unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused  # DDP would hang or raise on unused parameters


def test_case18_fp16_overflow_skips_the_step_and_clipping_sees_true_gradients():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    w.register_hook(lambda g: g * float("inf"))  # overflow in the backward
    optimizer_step((w * 2).sum(), opt, scaler, [w], clip_grad_norm=1.0)
    assert torch.equal(w.detach(), torch.ones(3)) and scaler.get_scale() < 2.0**10  # skipped, scale backed off

    v = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([v], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=True, init_scale=2.0**10)
    optimizer_step((v * 3).sum(), opt, scaler, [v], clip_grad_norm=1.0)
    # true gradient (3, 3, 3, 3) has norm 6: clipped to norm 1 after unscaling, so one step of lr 1 moves 1
    assert v.detach().norm().item() == pytest.approx(1.0, rel=1e-4)


def test_case20_23_resume_errors_and_auto_without_checkpoint(parts, tmp_path, caplog):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint there"):
        _run(parts, tmp_path / "a", max_iters=2, resume=str(tmp_path / "none.pt"))
    with caplog.at_level(logging.INFO):
        _run(parts, tmp_path / "b", max_iters=2, resume="auto")
    assert "no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        _run(parts, tmp_path / "b", max_iters=4, resume="auto")


def test_case22_resume_with_a_different_setup_names_the_differences(parts, tmp_path, caplog):
    _run(parts, tmp_path, max_iters=2, meta={"seed": 0, "world_size": 1})
    with caplog.at_level(logging.WARNING):
        _run(parts, tmp_path, max_iters=3, resume="auto", meta={"seed": 5, "world_size": 2})
    assert "seed: 0 -> 5" in caplog.text and "world_size: 1 -> 2" in caplog.text
    cfg, _, train_set, _ = parts
    with pytest.raises(checkpoint.CheckpointError, match="num_classes"):
        _run(parts, tmp_path, _model(cfg, 9), max_iters=4, resume="auto", meta={"seed": 5, "world_size": 2,
                                                                                  "num_classes": 9})


def test_finished_run_is_skipped_and_a_changed_setup_is_refused(parts, tmp_path, caplog):
    """Issue #5: re-running a sweep skips finished jobs (by their set-up) instead of training them again."""
    first = _run(parts, tmp_path, max_iters=2, meta={"seed": 0, "loss": "l1"})
    mtime = (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = _run(parts, tmp_path, max_iters=2, resume="auto", meta={"seed": 0, "loss": "l1"})
    assert "skipping it" in caplog.text
    assert again == {k: first[k] for k in again}  # metrics.json's numbers, not a new evaluation's
    assert (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime
    with pytest.raises(checkpoint.CheckpointError, match=r"(?s)loss: 'l1' -> 'l2'.*has finished"):
        _run(parts, tmp_path, max_iters=2, resume="auto", meta={"seed": 0, "loss": "l2"})
