"""Every config composes and instantiates; typos, wrong types and bad ranges fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from detlib.config import Config, check_ranges
from detlib.losses import BoxLoss

from .conftest import CONFIGS, compose_cfg

LOSSES = sorted(p.stem for p in Path(CONFIGS, "loss").glob("*.yaml"))
RPN_LOSSES = sorted(p.stem for p in Path(CONFIGS, "rpn_loss").glob("*.yaml"))
MODELS = sorted(p.stem for p in Path(CONFIGS, "model").glob("*.yaml"))
DATA = sorted(p.stem for p in Path(CONFIGS, "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in Path(CONFIGS, "experiment").glob("*.yaml"))


def test_groups_are_complete():
    assert {"smooth_l1", "huber", "l1", "l2", "balanced_l1", "iou", "giou", "diou", "ciou", "eiou"} <= set(LOSSES)
    assert set(RPN_LOSSES) == set(LOSSES)


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_config_instantiates(name):
    cfg = compose_cfg(f"loss={name}", f"rpn_loss={name}")
    for node in (cfg.loss, cfg.rpn_loss):
        loss = instantiate(node)
        assert isinstance(loss, BoxLoss) and loss.weight == node.weight


def test_rpn_default_is_torchvision_smooth_l1():
    loss = instantiate(compose_cfg().rpn_loss)
    assert type(loss).__name__ == "SmoothL1" and loss.params["beta"] == pytest.approx(1 / 9)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_instantiates(name):
    cfg = compose_cfg(f"model={name}")
    model = instantiate(cfg.model, num_classes=5, box_loss=instantiate(cfg.loss), rpn_box_loss=instantiate(cfg.rpn_loss))
    assert model.roi_head.cls_score.out_features == 5


@pytest.mark.parametrize("name", DATA)
@pytest.mark.parametrize("experiment", [None, *EXPERIMENTS])
def test_data_and_experiments_compose_to_the_schema(name, experiment):
    overrides = [f"data={name}"] + ([f"experiment={experiment}"] if experiment else [])
    typed = OmegaConf.to_object(compose_cfg(*overrides))
    assert isinstance(typed, Config)
    check_ranges(typed)


def test_overrides_from_the_readme():
    cfg = compose_cfg("loss=huber", "loss.delta=0.5")
    assert instantiate(cfg.loss).params["delta"] == 0.5
    assert instantiate(compose_cfg("loss=smooth_l1", "loss.beta=0.111").loss).params["beta"] == 0.111


@pytest.mark.parametrize("override,error", [
    ("trainer.lr=abc", ValidationError),
    ("trainer.lrr=0.1", ConfigCompositionException),
    ("loss.dleta=0.5", ConfigCompositionException),
    ("loss=foo", ConfigCompositionException),
])
def test_typos_and_wrong_types_fail_at_compose(override, error):
    overrides = ["loss=huber", override] if override.startswith("loss.") else [override]
    with pytest.raises((error, ConfigKeyError, ValidationError, ConfigCompositionException)) as e:
        compose_cfg(*overrides)
    if override == "loss=foo":
        assert "huber" in str(e.value) and "smooth_l1" in str(e.value)  # Hydra lists the options


@pytest.mark.parametrize("override,key", [
    ("trainer.lr=-1", "trainer.lr"),
    ("data.batch_size=0", "data.batch_size"),
    ("trainer.clip_grad_norm=0", "trainer.clip_grad_norm"),
    ("trainer.device=tpu", "trainer.device"),
    ("data.invalid=ignore", "data.invalid"),
])
def test_ranges_name_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        check_ranges(OmegaConf.to_object(compose_cfg(override)))


def test_slurm_launcher_config_composes_with_the_plugin():
    """configs/hydra/launcher/slurm.yaml extends hydra-submitit-launcher's own config (a dev dependency)."""
    from hydra import compose, initialize_config_dir

    from .conftest import CONFIGS

    with initialize_config_dir(config_dir=CONFIGS, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.gpus_per_node) == ("gpu", 1)
