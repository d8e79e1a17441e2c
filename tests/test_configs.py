"""Every config composes and instantiates; typos, wrong types and bad ranges fail with the key named."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from detlib.config import Config, check_ranges
from detlib.engine.build import build_model
from detlib.losses import BoxLoss

from .conftest import CONFIGS, compose_cfg

LOSSES = sorted(p.stem for p in Path(CONFIGS, "loss").glob("*.yaml"))
MODELS = sorted(p.stem for p in Path(CONFIGS, "model").glob("*.yaml"))
DATA = sorted(p.stem for p in Path(CONFIGS, "data").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in Path(CONFIGS, "experiment").glob("*.yaml"))


def test_groups_are_complete():
    assert {"smooth_l1", "huber", "l1", "l2", "balanced_l1", "iou", "giou", "diou", "ciou", "eiou",
            "siou", "alpha_iou", "kl"} <= set(LOSSES)
    assert not Path(CONFIGS, "rpn_loss").exists()  # the RPN takes the same group: loss@rpn_loss=NAME


@pytest.mark.parametrize("name", LOSSES)
def test_every_loss_config_instantiates(name):
    cfg = compose_cfg(f"loss={name}", f"loss@rpn_loss={name}")
    for node in (cfg.loss, cfg.rpn_loss):
        loss = instantiate(node)
        assert isinstance(loss, BoxLoss) and loss.weight == node.weight


def test_rpn_default_is_torchvision_smooth_l1():
    loss = instantiate(compose_cfg().rpn_loss)
    assert type(loss).__name__ == "SmoothL1" and loss.params["beta"] == pytest.approx(1 / 9)


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_instantiates(name):
    cfg = compose_cfg(f"model={name}")
    model = build_model(cfg, 5)
    assert model.roi_head.cls_score.out_features == 5


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_passes_the_key_check(name):
    check_ranges(OmegaConf.to_object(compose_cfg(f"model={name}")))


def test_model_family_shares_one_base():
    """Each default is set once, in configs/model/base/faster_rcnn.yaml; a model states only what differs."""
    r18, r50 = (OmegaConf.to_container(compose_cfg(f"model=faster_rcnn_r{d}_fpn").model) for d in (18, 50))
    assert r18 == r50 | {"backbone": r50["backbone"] | {"depth": 18}}
    base = OmegaConf.load(Path(CONFIGS, "model", "base", "faster_rcnn.yaml"))
    for name in MODELS:
        model = compose_cfg(f"model={name}").model
        assert set(model) == set(base), name  # no key of a model's own, none left out
        for part in ("rpn", "roi_head"):
            assert model[part] is None or set(model[part]) == set(base[part]), (name, part)


@pytest.mark.parametrize("overrides,unknown,suggestion", [
    (["+trainer.max_iter=10"], "trainer.max_iter", "trainer.max_iters"),  # Hydra's own hint after a typo
    (["+data.batchsize=2"], "data.batchsize", "data.batch_size"),
    (["+seeds=1"], "seeds", "seed"),
    (["+model.backbone.widht=16"], "model.backbone.widht", "model.backbone.width"),
    (["+model.roi_head.scor_thresh=0.1"], "model.roi_head.scor_thresh", "model.roi_head.score_thresh"),
    (["+model.roi_head.roi_align.sampling=1"], "model.roi_head.roi_align.sampling",
     "model.roi_head.roi_align.sampling_ratio"),
    (["model=fast_rcnn", "+model.proposals.topk=5"], "model.proposals.topk", "model.proposals.top_k"),
])
def test_unknown_keys_fail_at_start_naming_the_closest_valid_one(overrides, unknown, suggestion):
    with pytest.raises(ValueError, match=rf"unknown key {re.escape(unknown)} \(did you mean {re.escape(suggestion)}\?\)"):
        check_ranges(OmegaConf.to_object(compose_cfg(*overrides)))


def test_unknown_keys_without_a_close_one_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown key model\.rpn\.foo \(valid: .*nms_thresh"):
        check_ranges(OmegaConf.to_object(compose_cfg("+model.rpn.foo=1")))
    with pytest.raises(ValueError, match=r"unknown key model\.num_classes \(not a config key: it comes from the data"):
        check_ranges(OmegaConf.to_object(compose_cfg("+model.num_classes=3")))
    with pytest.raises(ValueError, match=r"unknown key model\.rpn\.box_loss \(not a config key: it comes from rpn_loss"):
        check_ranges(OmegaConf.to_object(compose_cfg("+model.rpn.box_loss=1")))


@pytest.mark.parametrize("override,key", [
    ("trainer.amp=fp32", "trainer.amp"),
    ("trainer.schedule=poly", "trainer.schedule"),
    ("trainer.on_nonfinite=ignore", "trainer.on_nonfinite"),
    ("data.name=kitti", "data.name"),
    ("eval.backend=detectron2", "eval.backend"),
    ("data.exif_orientation=rotate", "data.exif_orientation"),
])
def test_fixed_value_sets_fail_at_compose_with_the_options(override, key):
    with pytest.raises(ConfigCompositionException) as e:
        compose_cfg(override)
    cause = str(e.value.__cause__)
    assert f"full_key: {key}" in cause and "expected one of [" in cause


def test_fixed_value_sets_are_checked_in_configs_built_in_python():
    cfg = Config()
    cfg.trainer.amp = "fp32"
    with pytest.raises(ValueError, match=r"config: trainer\.amp must be auto\|off\|bf16\|fp16, got 'fp32'"):
        check_ranges(cfg)


def test_fixed_value_sets_read_as_plain_strings():
    cfg = compose_cfg("trainer.amp=bf16", "eval.backend=faster_coco_eval", "trainer.schedule=step")
    typed = OmegaConf.to_object(cfg)
    t = typed.trainer
    assert t.amp == "bf16" and t.schedule != "cosine" and f"{t.amp}/{typed.eval.backend}" == "bf16/faster_coco_eval"
    assert {"off": 0, "bf16": 1}[t.amp] == 1 and json.dumps([t.amp, typed.data.name]) == '["bf16", "synthetic"]'
    recorded = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)["trainer"]["amp"]
    assert type(recorded) is str and recorded == "bf16"


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
    alpha = instantiate(compose_cfg("loss=alpha_iou", "loss.alpha=2", "loss.mode=giou").loss)
    assert alpha.params == {"alpha": 2.0, "mode": "giou"}
    kl = compose_cfg("loss=kl", "model.roi_head.variance_voting=true")
    check_ranges(OmegaConf.to_object(kl))
    assert instantiate(kl.loss).needs_log_variance and kl.model.roi_head.variance_voting is True


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
    ("trainer.ema_decay=1.0", "trainer.ema_decay"),
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


def test_a_negative_thread_count_is_refused_naming_the_key():
    from .conftest import compose_cfg

    with pytest.raises(ValueError, match=r"trainer\.num_threads.*-1"):
        check_ranges(OmegaConf.to_object(compose_cfg("trainer.num_threads=-1")))


@pytest.mark.parametrize("override,key", [
    ("model.roi_head.fg_iou_thresh=1.5", r"model\.roi_head\.fg_iou_thresh.*1\.5"),
    ("model.roi_head.bg_iou_thresh=-0.1", r"model\.roi_head\.bg_iou_thresh"),
    ("model.rpn.fg_iou_thresh=0.2", r"model\.rpn\.bg_iou_thresh must be <= model\.rpn\.fg_iou_thresh"),
    ("model.rpn.positive_fraction=0", r"model\.rpn\.positive_fraction"),
    ("model.roi_head.positive_fraction=2", r"model\.roi_head\.positive_fraction"),
    ("model.rpn.nms_thresh=1.7", r"model\.rpn\.nms_thresh"),
    ("model.roi_head.nms_thresh=-1", r"model\.roi_head\.nms_thresh"),
    ("model.roi_head.score_thresh=1.01", r"model\.roi_head\.score_thresh"),
    ("model.roi_head.detections_per_img=0", r"model\.roi_head\.detections_per_img"),
    ("model.min_size=[0]", r"model\.min_size\.0 must be > 0, got 0"),
    ("model.max_size=0", r"model\.max_size"),
    ("model.roi_head.score_thresh=nan", r"model\.roi_head\.score_thresh.*nan"),
    ("model.roi_head.voting_sigma_t=0", r"model\.roi_head\.voting_sigma_t must be > 0"),
])
def test_every_model_threshold_and_fraction_is_range_checked_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        check_ranges(OmegaConf.to_object(compose_cfg(override)))


@pytest.mark.parametrize("override,key", [
    ("seed=-1", r"^config: seed must be in \[0, 2\*\*32\).*-1"),
    ("trainer.lr=inf", r"trainer\.lr must be a finite number, got inf"),
    ("trainer.lr=nan", r"trainer\.lr must be a finite number, got nan"),
    ("trainer.momentum=nan", r"trainer\.momentum"),
])
def test_seed_and_non_finite_trainer_values_are_refused_naming_the_key(override, key):
    with pytest.raises(ValueError, match=key):
        check_ranges(OmegaConf.to_object(compose_cfg(override)))


def test_every_model_config_passes_the_model_range_check():
    for name in MODELS:
        check_ranges(OmegaConf.to_object(compose_cfg(f"model={name}")))
