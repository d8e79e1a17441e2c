"""bf16 autocast and channels_last on the CPU: every loss trains finite, channels_last detects as NCHW does,
kill-and-resume stays bit-exact, and the tools run the model in the run's precision."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from detlib.data.build import build_datasets
from detlib.data.coco import collate
from detlib.device import autocast, channels_last
from detlib.engine.build import build_model
from detlib.engine.restore import load_run_config
from detlib.engine.trainer import Job, RunMeta, optimizer_step, train
from detlib.losses import SmoothL1
from detlib.predictor import Predictor

from .conftest import compose_cfg

LOSSES = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "loss").glob("*.yaml"))


@pytest.fixture(scope="module")
def parts(data_root):
    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.progress=false", "trainer.amp=bf16",
                      "trainer.device=cpu")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    return cfg, typed, train_set, val_set


@pytest.mark.parametrize("loss", LOSSES)
def test_bf16_on_cpu_trains_every_loss_finite(parts, loss):
    """Both heads train with ``loss`` (``loss@rpn_loss`` too, but for a loss that needs predicted variances, which
    only the box head makes) for 3 steps in bf16 + channels_last: every loss term and gradient is finite, and the
    boxes the heads compare are float32."""
    cfg, typed, train_set, _ = parts
    torch.manual_seed(0)
    box_loss = instantiate(compose_cfg(f"loss={loss}").loss)
    rpn_loss = instantiate(compose_cfg(*[] if box_loss.needs_log_variance else [f"loss@rpn_loss={loss}"]).rpn_loss)
    model = channels_last(build_model(cfg, train_set.num_classes, box_loss, rpn_loss)).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.002, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for step in range(3):
        images, targets = collate([train_set[i] for i in range(4 * step, 4 * step + 4)])
        with autocast(torch.device("cpu"), torch.bfloat16):
            out = model(images, targets)
        assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in out["losses"].values()), out["losses"]
        assert out["diagnostics"]["dump/proposals"].dtype == torch.float32
        optimizer_step(sum(out["losses"].values()), opt, scaler, params, None)
        assert all(torch.isfinite(p.grad).all() for p in params if p.grad is not None)


def test_channels_last_detects_as_nchw_within_bf16_tolerance(trained, parts):
    """The smoke run's model in bf16, NCHW and channels_last: the same feature maps, class scores and
    decoded boxes on the same proposals, and the same confident detections, within bf16 rounding."""
    _, _, _, val_set = parts
    images = [val_set[i][0] for i in range(4)]
    runs = []
    for cl in (False, True):
        model = Predictor.from_run(trained[0], device="cpu", amp="bf16").model
        model = channels_last(model, cl) if cl else model.float().to(memory_format=torch.contiguous_format)
        assert model.backbone.stages[0][0][0].weight.is_contiguous(memory_format=torch.channels_last) == cl
        with torch.no_grad(), autocast(torch.device("cpu"), torch.bfloat16):
            image_list, _ = model.transform(images)
            feats = model.backbone(image_list.tensors)
            props = runs[0][1] if runs else model.rpn(image_list, feats)[0]
            logits, deltas = model.roi_head(feats, props, image_list.image_sizes)
            boxes = model.roi_head.box_coder.decode(deltas.float(), props)
            runs.append((feats, props, logits.float().softmax(-1), boxes, model(images)["detections"]))
    (fa, _, sa, ba, da), (fb, _, sb, bb, db) = runs
    for k in fa:
        torch.testing.assert_close(fa[k].float(), fb[k].float(), rtol=0.05, atol=0.05)
    torch.testing.assert_close(sa, sb, rtol=0, atol=0.02)
    torch.testing.assert_close(ba, bb, rtol=0, atol=1.0)  # px
    for a, b in zip(da, db):
        assert a["boxes"].dtype == torch.float32 and a["scores"].dtype == torch.float32
        for box, score, label in zip(a["boxes"][a["scores"] > 0.5], a["scores"][a["scores"] > 0.5],
                                     a["labels"][a["scores"] > 0.5]):
            same = (b["labels"] == label) & ((b["boxes"] - box).abs().max(1).values < 1.0)
            assert same.any() and (b["scores"][same] - score).abs().min() < 0.02


class StopAt(SmoothL1):
    """Smooth L1 that raises on its ``at``-th call: a crash mid-run, after a checkpoint."""

    def __init__(self, at: int) -> None:
        super().__init__(beta=1 / 9)
        self.at, self.calls = at, 0

    def forward(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError("killed")
        return super().forward(*args, **kwargs)


def test_bf16_crash_then_resume_is_bit_exact(parts, tmp_path):
    """6 steps in bf16 + channels_last straight, against 3 steps, a crash at step 5, and resume from the
    checkpoint of step 3: the same final weights, bit for bit."""
    cfg, typed, train_set, val_set = parts
    tcfg = dataclasses.replace(typed.trainer, eval_period=0, checkpoint_period=3, max_iters=6)

    def run(run_dir, box_loss=None):
        torch.manual_seed(0)
        model = build_model(cfg, train_set.num_classes, box_loss)
        train(Job(model, train_set, val_set, dataclasses.replace(typed, trainer=tcfg), run_dir,
                  RunMeta({"seed": typed.seed})))
        return model.state_dict()

    straight = run(tmp_path / "straight")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed", StopAt(5))
    resumed = run(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_predictor_runs_in_the_runs_precision_and_layout(trained):
    run_dir = trained[0]
    cfg = load_run_config(run_dir)
    p = Predictor.from_run(run_dir, device="cpu")
    assert p.amp == str(cfg.trainer.amp) and p.model.backbone.stages[0][0][0].weight.is_contiguous(
        memory_format=torch.channels_last)
    bf16 = Predictor.from_run(run_dir, device="cpu", amp="bf16")
    image = torch.rand(3, 128, 128)
    a, b = p(image), bf16(image)
    assert bf16.amp_dtype == torch.bfloat16 and b["boxes"].dtype == torch.float32 and b["scores"].dtype == torch.float32
    assert a["labels"].shape[0] > 0 and b["labels"].shape[0] > 0
