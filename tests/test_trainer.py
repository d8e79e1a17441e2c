"""The training loop's guards and resume logic, in-process on the smoke data."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detlib.data.build import build_datasets
from detlib.data.sampler import TrainBatchSampler
from detlib.engine import checkpoint
from detlib.engine.build import build_model
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
    return build_model(cfg, num_classes, box_loss)


class NaNOnCall(L1):
    """An L1 loss that returns NaN on the listed calls (1-based), to test the guard."""

    def __init__(self, bad: set[int]):
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        out = super().forward(*args, **kwargs)
        return out * float("nan") if self.calls in self.bad else out


def _run(parts, run_dir, model=None, meta=None, **trainer):
    cfg, typed, train_set, val_set = parts
    tcfg = dataclasses.replace(typed.trainer, **trainer)
    model = model or _model(cfg, train_set.num_classes)
    return train(model, train_set, val_set, tcfg, typed.eval, run_dir, typed.data.batch_size, 0, typed.seed,
                 meta or {"identity": {"seed": typed.seed}})


def test_nonfinite_loss_stops_naming_iteration_terms_and_images(parts, tmp_path):
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


def test_nonfinite_skip_mode_skips_counts_and_stops_after_m_in_a_row(parts, tmp_path, caplog):
    cfg, _, train_set, _ = parts
    model = _model(cfg, train_set.num_classes, NaNOnCall({2}))
    with caplog.at_level(logging.WARNING):
        stats = _run(parts, tmp_path / "a", model, max_iters=4, on_nonfinite="skip", max_nonfinite=2)
    assert "skipping step" in caplog.text and "iteration 2" in caplog.text and stats["AP"] is not None
    model = _model(cfg, train_set.num_classes, NaNOnCall({2, 3}))
    with pytest.raises(NonFiniteLossError, match="iteration 3"):
        _run(parts, tmp_path / "b", model, max_iters=6, on_nonfinite="skip", max_nonfinite=2)


def test_batch_without_foreground_gives_every_parameter_a_gradient(parts):
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


def test_fp16_overflow_skips_the_step_and_clipping_sees_true_gradients():
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


def test_resume_errors_and_auto_without_checkpoint(parts, tmp_path, caplog):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint there"):
        _run(parts, tmp_path / "a", max_iters=2, resume=str(tmp_path / "none.pt"))
    with caplog.at_level(logging.INFO):
        _run(parts, tmp_path / "b", max_iters=2, resume="auto")
    assert "no checkpoint in" in caplog.text and "starting fresh" in caplog.text
    last = tmp_path / "b" / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        _run(parts, tmp_path / "b", max_iters=4, resume="auto")


def test_resume_with_a_different_identity_is_refused_naming_only_the_differing_keys(parts, tmp_path):
    """Finished or not, a checkpoint of another set-up is never continued (it used to warn and train on)."""
    ident = {"seed": 0, "world_size": 1, "loss._target_": "detlib.losses.SmoothL1", "trainer.lr": 0.02}
    _run(parts, tmp_path, max_iters=2, checkpoint_period=1, meta={"identity": ident})
    changed = ident | {"seed": 5, "loss._target_": "detlib.losses.L1"}
    for max_iters in (4, 2):  # unfinished (continuing to 4) and finished
        with pytest.raises(checkpoint.CheckpointError) as e:
            _run(parts, tmp_path, max_iters=max_iters, resume="auto", meta={"identity": changed})
        msg = str(e.value)
        assert "seed: 0 -> 5" in msg and "loss._target_: detlib.losses.SmoothL1 -> detlib.losses.L1" in msg
        assert "trainer.lr" not in msg and "world_size" not in msg  # only what differs
    assert checkpoint.load(tmp_path / "checkpoints" / "last.pt")["iteration"] == 2  # nothing trained on


def test_checkpoint_without_identity_is_refused(parts, tmp_path):
    _run(parts, tmp_path, max_iters=2, meta={"identity": {"seed": 0}})
    state = checkpoint.load(tmp_path / "checkpoints" / "last.pt")
    del state["meta"]["identity"]
    torch.save(state, tmp_path / "old.pt")
    with pytest.raises(checkpoint.CheckpointError, match="no run identity"):
        _run(parts, tmp_path / "b", max_iters=3, resume=str(tmp_path / "old.pt"))


def test_resuming_a_trained_checkpoint_evaluates_without_training(parts, tmp_path, caplog):
    first = _run(parts, tmp_path, max_iters=2)
    mtime = (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        again = _run(parts, tmp_path, max_iters=2, resume="auto")
    assert "evaluating only" in caplog.text
    assert again == first
    assert (tmp_path / "checkpoints" / "last.pt").stat().st_mtime_ns == mtime


def test_an_image_that_fails_to_decode_mid_run_stops_with_a_checkpoint_naming_the_file(tmp_path):
    """data.invalid=error: passed the start check, broken since; the run keeps what it trained."""
    from detlib.data.image import ImageDecodeError

    from .fixtures import write_coco

    write_coco(tmp_path / "data", num_train=8, num_val=2)
    cfg = compose_cfg("data=coco", f"data.root={tmp_path / 'data'}", "data.train_ann=train.json",
                      "data.train_images=images", "data.val_ann=val.json", "data.val_images=images",
                      "data.batch_size=2", "data.aspect_grouping=false", "model.min_size=64", "model.max_size=96",
                      "trainer.progress=false", "trainer.device=cpu", "trainer.warmup_iters=1")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    ids = train_set.ids
    first_batch = {i for i, _ in TrainBatchSampler(len(train_set), 2, 0, 0, 8).batch(0)}
    late = next(k for k in range(len(ids)) if k not in first_batch)  # an image the first step does not read
    src = tmp_path / "data" / "images" / train_set.coco.imgs[ids[late]]["file_name"]
    src.write_bytes(src.read_bytes()[:200])  # broken after the start check passed
    model = _model(cfg, train_set.num_classes)
    tcfg = dataclasses.replace(typed.trainer, max_iters=8, checkpoint_period=100)
    with pytest.raises(ImageDecodeError, match=src.name):
        train(model, train_set, val_set, tcfg, typed.eval, tmp_path / "run", 2, 0, 0, {"identity": {}})
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last.pt")
    assert 1 <= state["iteration"] < 8  # what was trained before the bad image is kept


def test_fp16_gradient_norm_logged_is_the_true_gradients_norm(parts, tmp_path):
    """GradScaler.step has unscaled the gradients when the norm is read: it must not be divided again."""
    import json

    cfg, typed, train_set, _ = parts
    model = _model(cfg, train_set.num_classes)
    _run(parts, tmp_path, model=model, amp="fp16", max_iters=2, log_period=1, checkpoint_period=0)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "train/grad_norm/total" in r][-1]
    assert logged["iteration"] == 2
    by_hand = torch.linalg.vector_norm(torch.stack([p.grad.float().norm() for p in model.parameters()
                                                    if p.grad is not None]))
    assert logged["train/grad_norm/total"] == pytest.approx(float(by_hand), rel=1e-5)
    assert logged["train/grad_norm/total"] > 1e-3  # not 65,536x too small


def test_out_of_memory_names_the_batch_size_and_image_size(parts, tmp_path, caplog, monkeypatch):
    """An OOM keeps its own exception (and traceback) and the log says what the step was at."""
    from detlib.engine import trainer

    def oom(*_a, **_k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(trainer, "step", oom)  # the allocator's failure, which no CPU run can provoke
    with caplog.at_level(logging.ERROR), pytest.raises(torch.cuda.OutOfMemoryError):
        _run(parts, tmp_path, max_iters=2)
    msg = caplog.text
    assert "out of memory at iteration 1: batch of 4 images (data.batch_size)" in msg
    assert "input sizes [(" in msg and "min_size [" in msg


def test_deferred_nonfinite_check_reads_the_device_once_and_names_the_first_bad_iteration(tmp_path):
    """On CUDA the guard keeps its flag on the device (no host sync before every backward) and is read at
    the loop's boundaries: it must still name the first bad iteration, and never skip in skip mode."""
    from detlib.engine.guards import NonFiniteGuard

    guard = NonFiniteGuard("stop", 5, tmp_path, None, deferred=True)
    losses = [1.0, 2.0, float("nan"), float("inf"), 3.0]
    for it, v in enumerate(losses):
        assert guard.check(torch.tensor(v), False, torch.device("cpu"), it) == (False, False, False)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at iteration 3 \(found at iteration 5"):
        guard.raise_if_bad(5)
    clean = NonFiniteGuard("record", 5, tmp_path, None, deferred=True)
    clean.check(torch.tensor(1.0), False, torch.device("cpu"), 0)
    clean.raise_if_bad(1)  # nothing bad: no error
    assert not NonFiniteGuard("skip", 5, tmp_path, None, deferred=True).deferred  # skip must know at once
    assert NonFiniteGuard("stop", 5, tmp_path, None, deferred=False).check(
        torch.tensor(float("nan")), False, torch.device("cpu"), 0)[0]


def test_cudnn_benchmark_defaults_on_only_for_one_input_size(parts, tmp_path):
    """Variable COCO/VOC sizes would retune every convolution: auto is on only for fixed-size inputs."""
    from detlib.data.coco import CocoDetection
    from detlib.engine.trainer import default_num_workers, fixed_input_size

    from .fixtures import write_coco

    cfg, _, train_set, _ = parts
    model = _model(cfg, train_set.num_classes)
    assert fixed_input_size(model, train_set)  # the built-in data: one size
    paths = write_coco(tmp_path)  # two image sizes
    assert not fixed_input_size(model, CocoDetection(paths["train"], tmp_path / "images", train=True))
    multi = build_model(compose_cfg("experiment=smoke", "model.min_size=[48,64]"), train_set.num_classes)
    assert not fixed_input_size(multi, train_set)  # multi-scale training: several sizes
    assert default_num_workers(torch.device("cpu")) == 0
    assert 0 <= default_num_workers(torch.device("cuda")) <= 8
