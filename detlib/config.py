"""Typed config schema, registered with Hydra's ConfigStore.

``configs/train.yaml`` starts its defaults list with ``detlib_schema``, so every yaml and every
command-line override is merged onto these dataclasses: a misspelt key, a wrong type
(``trainer.lr=abc``) or a value outside a fixed set (``trainer.amp=fp32``: the key is an ``Enum``)
fails at start-up with Hydra's own message. ``model``, ``loss``, ``rpn_loss``, ``optimizer`` and each
``writer`` are ``_target_`` trees (Hydra components); a key there is valid when its target's signature takes it. ``check_ranges``
checks what neither can say: keys added with ``+`` (``+trainer.max_iter=10``, ``+model.rpn.nms=0.5``)
and ranges (lr > 0, ...); the loss constructors check their own parameters.
Library code receives these dataclasses (``OmegaConf.to_object``), never a ``DictConfig``.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


class Choice(str, Enum):
    """A key with a fixed set of values; OmegaConf refuses any other, naming the key and the options.

    Also a ``str`` that prints, formats, hashes and json-dumps as its value, so library code compares it
    with plain strings (``cfg.amp == "fp16"``). Member names equal their values.
    """

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(self, spec)


class DataName(Choice):
    synthetic = "synthetic"
    coco = "coco"
    voc = "voc"


class Schedule(Choice):
    cosine = "cosine"
    step = "step"


class Amp(Choice):
    auto = "auto"  # bf16 where the device runs it fast (detlib.device.fast_bf16), else off; recorded resolved
    off = "off"
    bf16 = "bf16"
    fp16 = "fp16"


class OnNonFinite(Choice):
    stop = "stop"  # an error naming the iteration, terms and images (exit 1)
    skip = "skip"  # skip the step, up to max_nonfinite in a row
    record = "record"  # stop, and record the run as diverged (AP 0, diverged.json): a result, so sweeps go on


class ExifOrientation(Choice):
    apply = "apply"  # rotate/flip by the EXIF tag: width, height and boxes are in the displayed frame (as annotation tools export)
    ignore = "ignore"  # serve the pixels as stored: for datasets annotated on those


class EvalBackend(Choice):  # detlib.evaluation.backends.BACKENDS, in the same order (tests/test_coco_eval_backends.py)
    auto = "auto"  # the fastest installed that passes every parity test (backends.AUTO), else pycocotools
    pycocotools = "pycocotools"  # the reference
    ultrafast_pycocotools = "ultrafast_pycocotools"  # same numbers, Rust; a dependency
    hotcoco = "hotcoco"  # same numbers, Rust; the fast-eval extra
    faster_coco_eval = "faster_coco_eval"  # same 12 stats, C++, no true positives' IoU; the fast-eval extra


@dataclass
class SyntheticConfig:
    num_train: int = 3000
    num_val: int = 300
    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 12
    max_size: int = 64
    seed: int = 0


@dataclass
class VocConfig:
    year: str = "2007"  # data.root is VOCdevkit (VOC{year} is used) or the VOC{year} folder itself
    train_split: str = "trainval"  # ImageSets/Main/{split}.txt
    val_split: str = "test"  # VOC2012 has no public test annotations: use val


@dataclass
class NoiseConfig:
    """Annotation noise on the training split only (detlib/data/noise.py), fixed once per seed."""

    jitter: float = 0.0  # sigma of the Gaussian edge jitter, relative to box width/height
    outliers: float = 0.0  # fraction p of training boxes replaced by gross errors
    seed: int = 0  # the noise's own seed: the corrupted set stays the same across training seeds


@dataclass
class DataConfig:
    name: DataName = DataName.synthetic
    root: str = "~/.cache/detlib"  # synthetic: cache folder; coco: base for the relative paths below; voc: VOCdevkit
    train_ann: str = ""
    train_images: str = ""
    val_ann: str = ""
    val_images: str = ""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    voc: VocConfig = field(default_factory=VocConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    aspect_grouping: bool = False  # batches of only landscape or only portrait images (less padding)
    batch_size: int = 8
    num_workers: int | None = None  # null: 0 on CPU (measured fastest on 2 cores), on CUDA from the core count
    hflip_prob: float = 0.5
    invalid: str = "error"  # error | skip: what to do with a degenerate box or a bad image
    exif_orientation: ExifOrientation = ExifOrientation.apply  # JPEG orientation tags (phones): detlib/data/image.py
    keep_empty: bool = True  # keep training images without annotations


@dataclass
class TrainerConfig:
    device: str = "auto"  # auto | cpu | cuda (auto: cuda when present)
    max_iters: int = 1000
    lr: float = 0.02  # whatever the optimizer (configs/optimizer); the schedule scales it
    momentum: float = 0.9  # SGD's (configs/optimizer/sgd.yaml reads it)
    weight_decay: float = 1e-4
    norm_weight_decay: float | None = None  # normalisation layers' weights and biases; null: weight_decay
    bias_weight_decay: float | None = None  # the other biases; null: weight_decay (detlib/engine/optim.py)
    warmup_iters: int = 100
    warmup_factor: float = 0.001
    schedule: Schedule = Schedule.cosine
    steps: list[float] = field(default_factory=lambda: [0.67, 0.89])  # step schedule, as fractions of max_iters
    gamma: float = 0.1
    eval_period: int = 0  # 0: evaluate at the end only
    log_period: int = 20
    checkpoint_period: int = 250
    keep_last: int = 3
    resume: str = "auto"  # auto: continue the folder's last checkpoint (skip if finished) | new: start over, new folder | "" | PATH
    amp: Amp = Amp.off
    clip_grad_norm: float | None = None
    ema_decay: float | None = None  # evaluate an EMA of the weights (detlib/engine/ema.py), e.g. 0.999; null or 0: off
    on_nonfinite: OnNonFinite = OnNonFinite.stop
    max_nonfinite: int = 5  # with skip: stop after this many non-finite steps in a row
    num_threads: int = 0  # torch intra-op threads; 0 keeps torch's default
    channels_last: bool = True  # backbone in channels_last memory format, CPU and GPU (faster convs, most with bf16)
    # CUDA only: let cuDNN time and pick the fastest conv algorithms per input shape. null: on when every
    # training input has one size (the built-in data), off for COCO/VOC sizes, which would retune each shape.
    cudnn_benchmark: bool | None = None
    progress: bool = True


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_dets: list[int] = field(default_factory=lambda: [1, 10, 100])
    backend: EvalBackend = EvalBackend.auto  # which evaluator; never part of a run's identity (same numbers)
    metrics: list[str] = field(default_factory=list)  # besides COCO AP: voc07 (detlib/evaluation/evaluators.py)


@dataclass
class Config:
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: Any = MISSING  # _target_ trees: configs/model (defaults in model/base/), configs/loss (also as rpn_loss)
    loss: Any = MISSING
    rpn_loss: Any = MISSING
    optimizer: Any = None  # a _partial_ _target_ (configs/optimizer); None in a run.json from before: SGD
    writer: Any = None  # name -> a _partial_ _target_ (configs/writer); None: none (a Config built in Python)


def register() -> None:
    from omegaconf import OmegaConf

    from detlib.runs.lock import job_subdir, run_dir

    # A new run directory, claimed once and shared by every torchrun rank (configs/train.yaml: hydra.run.dir).
    OmegaConf.register_new_resolver("detlib_run_dir", run_dir, replace=True)
    OmegaConf.register_new_resolver("detlib_job_subdir", job_subdir, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="detlib_schema", node=Config)


def check_ranges(cfg: Config) -> None:
    """Unknown keys (``check_keys``), values of fixed sets (OmegaConf checks them too, but a ``Config`` can be
    built in Python), then range checks a type can't express; errors name the key and the value."""
    check_keys(cfg)
    for key, options, value in _bad_choices(cfg, ""):
        raise ValueError(f"config: {key} must be {options}, got {value!r}")
    t, d = cfg.trainer, cfg.data
    for key, value in _numbers({"trainer": t, "data": d, "eval": cfg.eval, "optimizer": cfg.optimizer or {}}, ""):
        if not math.isfinite(value):
            raise ValueError(f"config: {key} must be a finite number, got {value!r}")
    rules = [
        ("seed", 0 <= cfg.seed < 2**32, cfg.seed, "in [0, 2**32) (numpy's seed range)"),
        ("data.synthetic.seed", 0 <= d.synthetic.seed < 2**32, d.synthetic.seed, "in [0, 2**32)"),
        ("data.noise.seed", 0 <= d.noise.seed < 2**32, d.noise.seed, "in [0, 2**32)"),
        ("trainer.device", t.device in ("auto", "cpu", "cuda") or t.device.startswith("cuda:"), t.device, "auto|cpu|cuda"),
        ("trainer.max_iters", t.max_iters >= 1, t.max_iters, ">= 1"),
        ("trainer.lr", t.lr > 0, t.lr, "> 0"),
        ("trainer.momentum", 0 <= t.momentum < 1, t.momentum, "in [0, 1)"),
        ("trainer.weight_decay", t.weight_decay >= 0, t.weight_decay, ">= 0"),
        ("trainer.norm_weight_decay", t.norm_weight_decay is None or t.norm_weight_decay >= 0, t.norm_weight_decay,
         ">= 0 or null"),
        ("trainer.bias_weight_decay", t.bias_weight_decay is None or t.bias_weight_decay >= 0, t.bias_weight_decay,
         ">= 0 or null"),
        ("trainer.warmup_iters", t.warmup_iters >= 0, t.warmup_iters, ">= 0"),
        ("trainer.warmup_factor", 0 < t.warmup_factor <= 1, t.warmup_factor, "in (0, 1]"),
        ("trainer.steps", all(0 < s < 1 for s in t.steps), list(t.steps), "fractions in (0, 1)"),
        ("trainer.eval_period", t.eval_period >= 0, t.eval_period, ">= 0"),
        ("trainer.log_period", t.log_period >= 1, t.log_period, ">= 1"),
        ("trainer.checkpoint_period", t.checkpoint_period >= 0, t.checkpoint_period, ">= 0"),
        ("trainer.keep_last", t.keep_last >= 1, t.keep_last, ">= 1"),
        ("trainer.clip_grad_norm", t.clip_grad_norm is None or t.clip_grad_norm > 0, t.clip_grad_norm,
         "> 0 (or null to disable)"),
        ("trainer.ema_decay", t.ema_decay is None or 0 <= t.ema_decay < 1, t.ema_decay,
         "in [0, 1) (null or 0: no EMA)"),
        ("trainer.max_nonfinite", t.max_nonfinite >= 1, t.max_nonfinite, ">= 1"),
        ("trainer.num_threads", t.num_threads >= 0, t.num_threads, ">= 0 (0: torch's default)"),
        ("data.noise.jitter", d.noise.jitter >= 0, d.noise.jitter, ">= 0"),
        ("data.noise.outliers", 0 <= d.noise.outliers <= 1, d.noise.outliers, "in [0, 1]"),
        ("data.batch_size", d.batch_size >= 1, d.batch_size, ">= 1"),
        ("data.num_workers", d.num_workers is None or d.num_workers >= 0, d.num_workers, ">= 0 or null"),
        ("data.hflip_prob", 0 <= d.hflip_prob <= 1, d.hflip_prob, "in [0, 1]"),
        ("data.invalid", d.invalid in ("error", "skip"), d.invalid, "error|skip"),
        ("eval.batch_size", cfg.eval.batch_size >= 1, cfg.eval.batch_size, ">= 1"),
        ("eval.max_dets", len(cfg.eval.max_dets) == 3 and cfg.eval.max_dets[0] >= 1
         and all(a < b for a, b in zip(cfg.eval.max_dets, cfg.eval.max_dets[1:])),
         list(cfg.eval.max_dets), "three strictly increasing positive numbers"),
    ]
    for key, ok, value, rule in rules:
        if not ok:
            raise ValueError(f"config: {key} must be {rule}, got {value!r}")
    check_model_ranges(cfg.model)
    components = [("loss", cfg.loss, "a loss from configs/loss, chosen with loss=NAME"),
                  ("rpn_loss", cfg.rpn_loss, "a loss from configs/loss, chosen with loss@rpn_loss=NAME")]
    components += [("optimizer", cfg.optimizer, "an optimizer from configs/optimizer, chosen with optimizer=NAME")
                   ] if cfg.optimizer is not None else []
    components += [(f"writer.{k}", v, "a writer from configs/writer, added with +writer=NAME")
                   for k, v in (cfg.writer or {}).items()]
    for key, node, what in components:  # e.g. rpn_loss=l1 sets a string
        if node != MISSING and not (isinstance(node, Mapping) and "_target_" in node):
            raise ValueError(f"config: {key} must be {what}, got {node!r}")


# Range rules for the ``model`` tree, by the key's last name, wherever it sits (rpn, roi_head, proposals, a
# model of your own): a threshold or fraction outside its range does not fail, it trains a model without
# foreground (``roi_head.fg_iou_thresh=1.5``) or without detections, silently.
_UNIT = (lambda v: 0 <= v <= 1, "in [0, 1]")
_POSITIVE = (lambda v: v > 0, "> 0")
MODEL_RULES: dict[str, tuple] = {
    "fg_iou_thresh": _UNIT, "bg_iou_thresh": _UNIT, "nms_thresh": _UNIT, "score_thresh": _UNIT,
    "positive_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"), "target_outliers": _UNIT,
    "min_size": _POSITIVE, "max_size": _POSITIVE, "batch_size_per_image": (lambda v: v >= 1, ">= 1"),
    "detections_per_img": (lambda v: v >= 1, ">= 1"), "pre_nms_top_n_train": (lambda v: v >= 1, ">= 1"),
    "pre_nms_top_n_test": (lambda v: v >= 1, ">= 1"), "post_nms_top_n_train": (lambda v: v >= 1, ">= 1"),
    "post_nms_top_n_test": (lambda v: v >= 1, ">= 1"), "top_k": (lambda v: v >= 1, ">= 1"),
    "jitter": (lambda v: v >= 0, ">= 0"), "seed": (lambda v: 0 <= v < 2**32, "in [0, 2**32)"),
    "image_std": _POSITIVE, "voting_sigma_t": _POSITIVE,
}


def check_model_ranges(model: object) -> None:
    """Every number in the ``model`` tree is finite and, where ``MODEL_RULES`` names its key, in range (each
    element of a list, ``model.min_size=[0]``); a node's ``bg_iou_thresh`` is at most its ``fg_iou_thresh``.
    Errors name the key and the value."""
    for key, value in _numbers(model, "model."):
        name = key.split(".")[-1] if not key.split(".")[-1].isdigit() else key.split(".")[-2]
        ok, rule = MODEL_RULES.get(name, (lambda v: True, ""))
        if not math.isfinite(value) or not ok(value):
            raise ValueError(f"config: {key} must be {rule or 'a finite number'}, got {value!r}")
    for key, node in _nodes(model, "model"):
        fg, bg = node.get("fg_iou_thresh"), node.get("bg_iou_thresh")
        if isinstance(fg, (int, float)) and isinstance(bg, (int, float)) and bg > fg:
            raise ValueError(f"config: {key}.bg_iou_thresh must be <= {key}.fg_iou_thresh ({fg!r}), got {bg!r}")


def _numbers(node: object, prefix: str) -> Iterator[tuple[str, float]]:
    """``(dotted key, value)`` for every int or float under a dataclass, mapping or list (bools excluded)."""
    if is_dataclass(node):
        node = vars(node)
    if isinstance(node, Mapping):
        for k, v in node.items():
            yield from _numbers(v, f"{prefix}{k}.")
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from _numbers(v, f"{prefix}{i}.")
    elif isinstance(node, (int, float)) and not isinstance(node, bool):
        yield prefix.rstrip("."), node


def _nodes(node: object, prefix: str) -> Iterator[tuple[str, Mapping]]:
    """``(dotted key, mapping)`` for every mapping in a ``_target_`` tree, the root included."""
    if isinstance(node, Mapping):
        yield prefix, node
        for k, v in node.items():
            yield from _nodes(v, f"{prefix}.{k}")


# Keys Hydra's instantiate reads itself, valid in any _target_ node.
HYDRA_KEYS = frozenset({"_target_", "_partial_", "_convert_", "_recursive_", "_args_"})
# Arguments the code passes, and where from: ``instantiate(cfg.model, num_classes=..., box_loss=...,
# rpn_box_loss=...)`` and build_faster_rcnn's calls of the rpn and roi_head partials. Not config keys:
# set in the config, they would be silently replaced or clash.
INJECTED = {
    "model.": {"num_classes": "the data", "box_loss": "loss", "rpn_box_loss": "rpn_loss"},
    "model.rpn.": {"in_channels": "the backbone", "box_loss": "rpn_loss"},
    "model.roi_head.": {"in_channels": "the backbone", "num_classes": "the data", "box_loss": "loss"},
    "optimizer.": {"params": "the model", "lr": "trainer.lr", "weight_decay": "trainer.weight_decay"},
    "writer.*.": {"run_dir": "the run folder", "start": "the iteration the run starts at"},  # any writer
}


def _injected(prefix: str) -> dict[str, str]:
    """``INJECTED``'s entry for the node at ``prefix`` (``writer.jsonl.`` is one of ``writer.*.``)."""
    return next((v for k, v in INJECTED.items() if fnmatch.fnmatchcase(prefix, k)), {})


def check_keys(cfg: Config) -> None:
    """Every key is one the schema or its ``_target_`` takes; an unknown one names the closest valid key.

    Hydra's ``+key=value`` adds a key even to a typed node (``OmegaConf.to_object`` keeps it as an extra
    attribute), so ``+trainer.max_iter=10``, as Hydra's own hint suggests after a typo, would be set
    and never read. In the ``_target_`` trees a key is valid if the target's signature takes it.
    """
    problems = []
    for key, valid in _unknown_keys(cfg, ""):
        parent, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"did you mean {parent + '.' if parent else ''}{close[0]}?" if close else f"valid: {', '.join(valid) or 'none'}"
        if name in _injected(parent + "."):
            hint = f"not a config key: it comes from {_injected(parent + '.')[name]}"
        problems.append(f"unknown key {key} ({hint})")
    if problems:
        raise ValueError("config: " + "; ".join(problems))


def _bad_choices(node: object, prefix: str) -> Iterator[tuple[str, str, object]]:
    """``(dotted key, "a|b", value)`` for each ``Choice`` field of a dataclass whose value is not one of its set."""
    for f in fields(node):
        value = getattr(node, f.name)
        if isinstance(f.default, Choice):
            options = [m.value for m in type(f.default)]
            if value not in options:
                yield f"{prefix}{f.name}", "|".join(options), value
        elif is_dataclass(value):
            yield from _bad_choices(value, f"{prefix}{f.name}.")


def _unknown_keys(node: object, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """``(dotted key, valid names beside it)`` for each unknown key under a dataclass or a ``_target_`` tree."""
    if isinstance(node, list):
        for i, v in enumerate(node):
            yield from _unknown_keys(v, f"{prefix}{i}.")
        return
    if is_dataclass(node):
        valid, items = [f.name for f in fields(node)], vars(node).items()
    elif isinstance(node, Mapping):
        valid, items = _parameters(node.get("_target_")), node.items()
        valid = None if valid is None else [p for p in valid if p not in _injected(prefix)]
    else:
        return
    for k, v in items:
        if valid is not None and k not in valid and k not in HYDRA_KEYS:
            yield f"{prefix}{k}", valid
        else:
            yield from _unknown_keys(v, f"{prefix}{k}.")


def _parameters(target: object) -> list[str] | None:
    """The keyword arguments ``target`` (a dotted name) takes; None: any (``**kwargs``), or not a target here."""
    from hydra.utils import get_object

    if not isinstance(target, str):
        return None
    try:
        params = inspect.signature(get_object(target)).parameters.values()
    except Exception:  # a target that can't be found or inspected: instantiate reports it
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
