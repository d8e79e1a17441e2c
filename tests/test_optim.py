"""The optimizer config group (configs/optimizer) and the one place that builds it (detlib/engine/optim.py)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from detlib import runs
from detlib.config import check_ranges
from detlib.engine.optim import build_optimizer, check_optimizer, param_groups

from .conftest import compose_cfg


def _typed(*overrides):
    typed = OmegaConf.to_object(compose_cfg(*overrides))
    check_ranges(typed)
    return typed


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    net[0].weight.requires_grad_(False)  # a frozen weight is left out, as a frozen backbone stage
    return net


def test_the_default_is_todays_sgd_step_for_step():
    """optimizer=sgd (the default) with the trainer's lr, momentum and weight decay, one group of every trainable
    parameter: the same optimizer state and the same weights after two steps as SGD built by hand."""
    typed = _typed()
    assert typed.optimizer == {"_target_": "torch.optim.SGD", "_partial_": True, "momentum": 0.9}
    ours, theirs = _net(), _net()
    opt = build_optimizer(ours, typed.optimizer, typed.trainer)
    ref = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                          weight_decay=1e-4)
    x = torch.rand(2, 3, 8, 8)
    for _ in range(2):
        for net, o in ((ours, opt), (theirs, ref)):
            o.zero_grad()
            net(x).square().sum().backward()
            o.step()
    ours_sd, ref_sd = opt.state_dict(), ref.state_dict()
    assert ours_sd["param_groups"] == ref_sd["param_groups"] and ours_sd["state"].keys() == ref_sd["state"].keys()
    assert all(torch.equal(ours_sd["state"][i]["momentum_buffer"], s["momentum_buffer"]) for i, s in ref_sd["state"].items())
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)


def test_norm_and_bias_weight_decay_make_their_own_groups():
    net = _net()
    assert [len(g["params"]) for g in param_groups(net, 1e-4)] == [5]  # conv bias, BN weight and bias, linear
    groups = param_groups(net, 1e-4, norm_weight_decay=0.0, bias_weight_decay=0.5)
    assert [(len(g["params"]), g.get("weight_decay")) for g in groups] == [(2, 0.5), (2, 0.0), (1, None)]
    assert groups[1]["params"] == [net[1].weight, net[1].bias] and groups[2]["params"] == [net[4].weight]
    assert len(param_groups(net, 1e-4, norm_weight_decay=1e-4)) == 1  # the same decay: one group


def test_adamw_composes_with_its_own_scale_and_no_decay_on_norms():
    typed = _typed("optimizer=adamw")
    assert (typed.trainer.lr, typed.trainer.weight_decay, typed.trainer.norm_weight_decay) == (1e-3, 0.05, 0.0)
    assert _typed("optimizer=adamw", "trainer.lr=3e-4").trainer.lr == 3e-4  # the command line still wins
    opt = build_optimizer(_net(), typed.optimizer, typed.trainer)
    assert type(opt) is torch.optim.AdamW and [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert list(opt.param_groups[0]["betas"]) == [0.9, 0.999] and opt.param_groups[0]["lr"] == 1e-3


@pytest.mark.parametrize("overrides,message", [
    (["+optimizer.momentun=0.5"], r"unknown key optimizer\.momentun \(did you mean optimizer\.momentum\?\)"),
    (["+optimizer.lr=0.5"], r"unknown key optimizer\.lr \(not a config key: it comes from trainer\.lr\)"),
    (["optimizer=adamw", "+optimizer.beta=[0.9,0.99]"], r"unknown key optimizer\.beta \(did you mean optimizer\.betas"),
    (["optimizer=adamw", "optimizer.betas=[0.9,2.0]"], r"optimizer \(torch\.optim\.AdamW\): Invalid beta"),
    (["trainer.norm_weight_decay=-1"], r"trainer\.norm_weight_decay must be >= 0 or null"),
])
def test_a_bad_optimizer_setting_fails_at_start_up_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        typed = _typed(*overrides)
        check_optimizer(typed.optimizer, typed.trainer)


def test_the_run_identity_holds_the_optimizer():
    """Two runs that differ in their optimizer are two set-ups: a relaunch is refused, naming the keys."""
    def ident(*overrides):
        config = OmegaConf.to_container(compose_cfg(*overrides), resolve=True, enum_to_str=True)
        return runs.identity(config, world_size=1, num_classes=5, data_fingerprints={})

    sgd, adamw = ident(), ident("optimizer=adamw")
    assert sgd["optimizer._target_"] == "torch.optim.SGD" and sgd["optimizer.momentum"] == 0.9
    changed = {d.split(":")[0] for d in runs.diff(sgd, adamw)}
    assert {"optimizer._target_", "optimizer.betas", "trainer.lr", "trainer.norm_weight_decay"} <= changed
    assert runs.diff(sgd, ident("trainer.momentum=0.8")) == [
        "optimizer.momentum: 0.9 -> 0.8", "trainer.momentum: 0.9 -> 0.8"]


def test_adamw_trains_in_the_smoke_experiment_and_its_checkpoint_is_plain_data(data_root, tmp_path):
    from detlib.data.build import build_datasets
    from detlib.engine import checkpoint
    from detlib.engine.build import build_model
    from detlib.engine.trainer import Job, train

    cfg = compose_cfg("experiment=smoke", "optimizer=adamw", f"data.root={data_root}", "trainer.progress=false",
                      "trainer.device=cpu", "writer=[jsonl]")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    torch.manual_seed(0)
    model = build_model(cfg, train_set.num_classes)
    before = copy.deepcopy(model.state_dict())
    typed = dataclasses.replace(typed, trainer=dataclasses.replace(typed.trainer, max_iters=4, checkpoint_period=4))
    stats = train(Job(model, train_set, val_set, typed, tmp_path))
    assert stats["AP"] is not None
    saved = checkpoint.load(tmp_path / "checkpoints" / "last.pt")  # weights_only: nothing but plain data
    groups = saved["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert "exp_avg_sq" in next(iter(saved["optimizer"]["state"].values()))  # AdamW's state, resumable
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
