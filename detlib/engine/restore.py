"""Rebuild a run from its folder (``detlib.runs``): its config, its model, its checkpoint's weights.

The model is rebuilt from the run's own resolved config (its ``run.json``) the way ``train.py`` builds it
(``detlib.engine.build.build_model``), so evaluating a checkpoint gives the numbers the run itself reported.
To predict, nothing else is needed (``model_from_run``): the record's ``classes`` give the class count, the
names and the category ids, so a run folder (or a checkpoint and its ``run.json``) copied to a machine
without the training data still predicts and exports. To evaluate, the val set is built too
(``build_from_run``). A run folder is data: its config may only name trusted classes.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from torch import nn

from detlib import runs
from detlib.compose import compose_train, is_group
from detlib.config import Config, check_ranges, register
from detlib.data.build import build_datasets
from detlib.data.coco import CocoDetection
from detlib.engine.build import build_model
from detlib.engine.checkpoint import CheckpointError
from detlib.engine.checkpoint import load as load_checkpoint
from detlib.errors import ToolError
from detlib.modeling.proposals import check_proposal_ids

# What a run folder's config may instantiate: exact qualified names, never prefixes (``torch.`` would admit
# ``torch.hub.load`` and ``torch._inductor.codecache.PyCodeCache.load``, which run code). These are the
# components detlib's configs name; ``tests/test_safe_loading.py`` checks every ``_target_`` under configs/
# is here. Components of your own: ``DETLIB_TRUSTED_TARGETS=mypkg.Backbone,mypkg.Loss`` (exact names).
TRUSTED_TARGETS = frozenset({
    *(f"detlib.losses.{name}" for name in ("SmoothL1", "Huber", "L1", "L2", "BalancedL1", "IoULoss", "GIoULoss",
                                          "DIoULoss", "CIoULoss", "EIoULoss", "Cauchy", "SIoULoss",
                                          "AlphaIoULoss", "KLLoss")),
    "detlib.modeling.backbone.SmallConvFPN",
    "detlib.modeling.backbone.VGG16",
    "detlib.modeling.backbone.resnet_fpn",
    "detlib.modeling.backbone.mobilenet_v3_fpn",
    "detlib.modeling.box_head.RoIBoxHead",
    "detlib.modeling.detector.build_faster_rcnn",
    "detlib.modeling.detector.build_rpn",
    "detlib.modeling.proposals.build_proposal_source",
    "detlib.modeling.roi_align.MultiScaleRoIAlign",
    "detlib.engine.writers.TensorBoardWriter",  # the writers: built only by the trainer, never by a tool
    "detlib.engine.writers.JsonlWriter",
    "detlib.engine.writers.CsvWriter",
    "torchvision.ops.MultiScaleRoIAlign",
    "torch.optim.SGD",  # the optimizers: built only by the trainer, never by a tool
    "torch.optim.AdamW",
})


def _parse_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` overrides into config-group choices (``data=coco``) and dotted keys."""
    groups, keys = [], []
    for o in overrides:
        if "=" not in o:
            raise ToolError(f"config override must be key=value, got {o!r}")
        (groups if is_group(o.split("=", 1)[0]) else keys).append(o)
    return groups, keys


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's resolved config (its ``run.json``), with optional overrides on top.

    A group choice (``data=coco``) replaces that whole node with the group's yaml, composed by
    Hydra from ``configs/``; a dotted key (``data.root=/x``) changes one value of the saved config.
    """
    data = read_record(run_dir)  # the config the run started with; .hydra/ is rewritten by every launch in the folder
    if not data:
        raise ToolError(f"not a run directory (no {runs.RECORD}): {run_dir}")
    cfg = OmegaConf.create(data["config"])
    groups, keys = _parse_overrides(overrides)
    if groups:
        composed = compose_train(groups)
        for o in groups:
            key = o.split("=", 1)[0].lstrip("+~")
            cfg[key] = composed[key]
    cfg.merge_with_dotlist(keys)
    check_targets(cfg)
    return cfg


def trusted_targets() -> frozenset[str]:
    """``TRUSTED_TARGETS`` plus the exact names in ``DETLIB_TRUSTED_TARGETS`` (comma-separated)."""
    extra = {n.strip() for n in os.environ.get("DETLIB_TRUSTED_TARGETS", "").split(",") if n.strip()}
    for name in sorted(extra):
        if not name.replace("_", "a").replace(".", "a").isalnum() or name.endswith(".") or "." not in name:
            raise ToolError(f"DETLIB_TRUSTED_TARGETS: {name!r} is not an exact qualified name "
                            "(module.Name; prefixes are not accepted)")
    return TRUSTED_TARGETS | extra


def check_targets(cfg: DictConfig) -> None:
    """A run folder is data: its config may only instantiate the components in ``trusted_targets()``.

    Hydra's ``instantiate`` calls whatever ``_target_`` names, so a crafted ``run.json`` could otherwise
    run code. Every ``_target_`` in the whole config is checked, as written and with its interpolations
    resolved (an ``${oc.decode:...}`` could make a node), before anything is imported.
    """
    allowed = trusted_targets()
    for resolve in (False, True):
        try:
            node = OmegaConf.to_container(cfg, resolve=resolve)
        except Exception as e:  # an interpolation that does not resolve: nothing will be built from it
            raise ToolError(f"run config: cannot resolve its interpolations: {e}") from None
        for key, value in flatten_targets(node, ""):
            if not isinstance(value, str) or value not in allowed:
                raise ToolError(f"run config: {key} = {value!r} is not one of detlib's components; refusing to "
                                "instantiate it (set DETLIB_TRUSTED_TARGETS=module.Name if it is yours)")


def flatten_targets(node: object, prefix: str = "") -> list[tuple[str, object]]:
    """Every ``_target_`` under ``node`` (plain containers), with its dotted key (``prefix`` ends in a dot)."""
    if isinstance(node, dict):
        out = [(f"{prefix}_target_", node["_target_"])] if "_target_" in node else []
        return out + [t for k, v in node.items() for t in flatten_targets(v, f"{prefix}{k}.")]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in flatten_targets(v, f"{prefix}{i}.")]
    return []


def typed_config(cfg: DictConfig) -> Config:
    """``cfg`` checked against the schema (``detlib.config.Config``) and its range rules, as ``train.py`` does."""
    register()
    typed: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    check_ranges(typed)
    return typed


def build_from_run(cfg: DictConfig, run_dir: str | Path | None = None) -> tuple[nn.Module, CocoDetection]:
    """``(model, val_set)`` as ``train.py`` builds them; the model has fresh weights.

    ``run_dir``: the run the config comes from; its record's classes are matched by name to the data's
    (``match_classes``) and a val file other than the recorded one is named in a warning (``check_val_file``).

    Both splits are built (``build_datasets``), as in training: the class count comes from the data.
    A relative ``data.root`` is taken from the current folder (``train.py`` took it from where it was
    launched); pass ``--config-overrides data.root=...`` if that differs.
    """
    check_targets(cfg)
    typed = typed_config(cfg)
    try:
        train_set, val_set = build_datasets(typed.data)
    except (FileNotFoundError, NotADirectoryError) as e:
        recorded = (read_record(run_dir).get("data_files") or {}).get("val", "?") if run_dir is not None else "?"
        raise ToolError(f"evaluating {run_dir or 'the run'} on its val set needs the run's data, which is not here "
                        f"({e}; the run read {recorded}): point to a copy with --config-overrides data.root=DIR "
                        "(or data.val_ann=..., data.val_images=...). Predicting and exporting need no data: "
                        "tools/predict.py, tools/export.py") from None
    if run_dir is not None:
        record = read_record(run_dir)
        for dataset in (train_set, val_set):
            match_classes(dataset, record.get("classes"), run_dir)
        check_val_file(val_set, record, run_dir)
    model = build_model(cfg, train_set.num_classes)
    check_proposal_ids(model, val=val_set.ids)  # Fast R-CNN with a proposals file must cover the val images
    return model, val_set


def model_from_run(cfg: DictConfig, run_dir: str | Path) -> tuple[nn.Module, dict[int, str], dict[int, int]]:
    """``(model, names, label_to_cat)`` from the run's config and its record's classes, building no data;
    ``names``/``label_to_cat``: label 1..K -> class name / category id. A run recorded before its classes
    were (no ``classes`` in run.json) is rebuilt from its data (``build_from_run``), which must be here."""
    check_targets(cfg)
    typed_config(cfg)  # the schema and range checks train.py made
    meta = runs.recorded_classes(read_record(run_dir))
    if meta is None:
        warn(f"{Path(run_dir) / runs.RECORD} records no classes (an older run): its data are built to learn them")
        model, val_set = build_from_run(cfg, run_dir)
        return model, dict(enumerate(val_set.class_names, 1)), dict(val_set.label_to_cat)
    names, label_to_cat = meta
    return build_model(cfg, len(names) + 1), names, label_to_cat


def load_weights(model: nn.Module, path: str | Path, weights: str = "auto", state: dict | None = None) -> dict:
    """Load a checkpoint's weights into ``model``; returns the checkpoint (iteration, meta, ...) with
    ``loaded`` naming the weights loaded: ``ema`` (the moving average a run with ``trainer.ema_decay``
    evaluated, and so the default) or ``model`` (the trained weights themselves).

    ``weights``: ``auto`` (the EMA where the checkpoint has one), ``ema`` (an error without one) or ``model``.
    ``state``: the checkpoint at ``path`` already loaded (a tool checks it before building anything)."""
    if weights not in ("auto", "ema", "model"):
        raise ToolError(f"weights must be auto|ema|model, got {weights!r}")
    state = load_checkpoint(path) if state is None else state
    if weights == "ema" and "ema" not in state:
        raise ToolError(f"checkpoint {path} holds no EMA of the weights (the run had no trainer.ema_decay)")
    loaded = "ema" if weights != "model" and "ema" in state else "model"
    try:
        model.load_state_dict(state["ema"]["model"] if loaded == "ema" else state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the run's model: {str(e).splitlines()[0]}") from e
    state["loaded"] = loaded
    return state


def weights_note(state: dict) -> str:
    """Which weights ``load_weights`` loaded, for a log line: ``EMA weights (decay 0.999)`` or ``weights``."""
    if state.get("loaded") == "ema":
        return f"EMA weights (decay {state['ema']['decay']:g}, {state['ema']['updates']} updates)"
    return "trained weights" + (" (the run's EMA is in the checkpoint; not used)" if "ema" in state else "")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def read_record(run_dir: str | Path) -> dict:
    """The run's ``run.json`` (``detlib.runs.read_record``), which must hold its config; ``{}`` where there is
    none. An unreadable one is a ``ToolError`` naming it."""
    try:
        return runs.read_record(run_dir, need="config") or {}
    except runs.RunIdentityError as e:
        raise ToolError(str(e)) from None


def match_classes(dataset: CocoDetection, recorded: list[dict] | None, run_dir: str | Path) -> None:
    """Make the dataset's label k the class the run learned as label k, matched by name.

    ``recorded``: run.json's ``classes`` (label order). The same names under other ids (or in another id
    order) are remapped and said; other names are refused, naming what is missing and what is new. A run
    recorded before classes were (``None``): label k stays the file's k-th category by id, with a warning.
    """
    names = list(dataset.class_names)
    if not recorded:
        warn(f"{Path(run_dir) / runs.RECORD} records no classes (an older run): label k is taken to be the k-th "
             f"category by id of {dataset.ann_file} ({', '.join(names)}); check that is the order it trained on")
        return
    learned = [str(c["name"]) for c in recorded]
    if learned == names:
        return
    if Counter(learned) != Counter(names) or len(set(names)) != len(names):
        missing = sorted((Counter(learned) - Counter(names)).elements())
        new = sorted((Counter(names) - Counter(learned)).elements())
        raise ToolError(f"{dataset.ann_file}: its classes are not the ones run {run_dir} learned ({runs.RECORD} "
                        f"'classes': {', '.join(learned)}; the file: {', '.join(names)}; missing: {missing or 'none'},"
                        f" not learned: {new or 'none'}, or names repeated); evaluate on data with the run's classes")
    ids = {c["name"]: c["id"] for c in dataset.coco.cats.values()}
    dataset.set_label_order([ids[n] for n in learned])
    warn(f"{dataset.ann_file}: the run's classes under other ids, matched by name: "
         + ", ".join(f"{c['name']} (run id {c['id']} -> file id {ids[c['name']]})" for c in recorded))


def check_val_file(val_set: CocoDetection, record: dict, run_dir: str | Path) -> None:
    """Warn, naming the file, when the val annotations are not those the run recorded (their sha256)."""
    old = (record.get("identity") or {}).get("data.fingerprint.val")
    if old is None:
        return
    now = runs.fingerprint(val_set)
    if now != old:
        recorded = (record.get("data_files") or {}).get("val", "?")
        warn(f"{val_set.ann_file}: not the val annotations run {run_dir} recorded ({recorded}, sha256 {old[:12]}; "
             f"now sha256 {now[:12]}): the AP is not comparable with the run's own metrics")
