"""The EMA of the weights: the update against its formula, exact resume, and that it is what is evaluated."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from detlib.data.build import build_datasets
from detlib.engine import evaluation
from detlib.engine.build import build_model
from detlib.engine.ema import ModelEMA, ema_decay_at
from detlib.engine.trainer import Job, RunMeta, train
from detlib.evaluation.coco_eval import evaluate_coco

from .conftest import compose_cfg, run_train


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))


def test_decay_warms_up_then_stays_at_the_configured_value():
    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay_at(0.9, 1000) == 0.9
    with pytest.raises(ValueError, match="decay"):
        ModelEMA(_net(), 1.0)


def test_update_is_the_formula_by_hand_and_buffers_are_copied():
    model = _net()
    ema = ModelEMA(model, 0.5)
    w0 = model[0].weight.detach().clone()
    hand = w0.clone()
    for t in (1, 2, 3):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.25 * t)
        model.train()(torch.randn(4, 3))  # moves BatchNorm's running stats
        ema.update(model)
        d = min(0.5, (1 + t) / (10 + t))
        hand = d * hand + (1 - d) * model[0].weight.detach()
    assert ema.updates == 3
    torch.testing.assert_close(ema.module[0].weight, hand, rtol=0, atol=1e-6)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    for name in ("running_mean", "running_var", "num_batches_tracked"):  # copied, not averaged
        assert torch.equal(getattr(ema.module[1], name), getattr(model[1], name)), name
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())


@pytest.fixture(scope="module")
def parts(data_root):
    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.progress=false",
                      "trainer.ema_decay=0.9")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    return cfg, typed, train_set, val_set


def _run(parts, run_dir, **trainer):
    cfg, typed, train_set, val_set = parts
    torch.manual_seed(0)
    model = build_model(cfg, train_set.num_classes)
    job_cfg = dataclasses.replace(typed, trainer=dataclasses.replace(typed.trainer, **trainer))
    return train(Job(model, train_set, val_set, job_cfg, run_dir, RunMeta({"seed": typed.seed})))


@pytest.mark.slow
def test_the_evaluated_weights_are_the_ema_saved_in_the_checkpoint_and_its_detections_are_kept(parts, tmp_path, monkeypatch):
    seen = []
    real = evaluation.evaluate

    def spy(model, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return real(model, *args, **kwargs)

    monkeypatch.setattr(evaluation, "evaluate", spy)
    stats = _run(parts, tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert saved["ema"]["updates"] == saved["iteration"] == 6 and saved["ema"]["decay"] == 0.9
    assert len(seen) == 1
    for k, v in saved["ema"]["model"].items():
        assert torch.equal(seen[0][k], v), k
    assert any(not torch.equal(saved["model"][k], v) for k, v in saved["ema"]["model"].items())
    assert json.loads((tmp_path / "eval_detail.json").read_text())["weights"] == "ema"
    # The scored detections are kept (compare_runs bootstraps them): pycocotools on them gives the run's stats.
    dets = json.loads((tmp_path / "detections.json").read_text())
    assert dets
    assert evaluate_coco(parts[3].coco, dets, tuple(parts[1].eval.max_dets))[0] == stats


@pytest.mark.slow
def test_resumed_ema_equals_the_straight_runs(parts, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    a = _run(parts, straight)
    _run(parts, resumed)
    for name in ("last.pt", "model_0000006.pt"):  # as if killed after the checkpoint at iteration 3
        (resumed / "checkpoints" / name).unlink()
    b = _run(parts, resumed)
    sa, sb = (torch.load(d / "checkpoints" / "last.pt", weights_only=True) for d in (straight, resumed))
    assert sa["ema"]["updates"] == sb["ema"]["updates"] == 6
    for k, v in sa["ema"]["model"].items():
        assert torch.equal(v, sb["ema"]["model"][k]), k
    assert a == b


@pytest.mark.slow
def test_evaluate_run_and_the_predictor_use_the_ema_weights(tmp_path, data_root):
    from detlib import Predictor
    from detlib.tools import evaluate

    run_dir = tmp_path / "run"
    proc = run_train("experiment=smoke", "trainer.device=cpu", f"data.root={data_root}", "trainer.ema_decay=0.9",
                     f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "evaluating the EMA of the weights (decay 0.9)" in proc.stderr + proc.stdout
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate.main(["--run", str(run_dir), "--device", "cpu"]) == 0
        assert evaluate.main(["--run", str(run_dir), "--device", "cpu", "--weights", "model",
                              "--out", str(tmp_path / "raw" / "metrics.json")]) == 0
    assert "EMA weights (decay 0.9, 6 updates)" in out.getvalue()
    assert (run_dir / "eval" / "metrics.json").read_text() == (run_dir / "metrics.json").read_text()
    assert json.loads((run_dir / "eval" / "eval_detail.json").read_text())["weights"] == "ema"
    ema_dets = json.loads((run_dir / "eval" / "detections.json").read_text())
    raw_dets = json.loads((tmp_path / "raw" / "detections.json").read_text())
    assert ema_dets != raw_dets
    predictor = Predictor.from_run(run_dir, device="cpu")
    ema = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["ema"]["model"]
    assert predictor.weights == "ema"
    for k, v in predictor.model.state_dict().items():
        assert torch.equal(v, ema[k]), k
