"""What the tools share: read a run directory, rebuild its model and val set, load COCO-results files.

A run directory is what ``train.py`` writes (``.hydra/config.yaml``, ``checkpoints/last.pt``,
``metrics.json``, ``eval_detail.json``, ``tb/``). The model is rebuilt from the run's own resolved
config, the way ``train.py`` builds it (``instantiate(cfg.model, num_classes=..., box_loss=...)``),
so evaluating a checkpoint gives the numbers the run itself reported.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from detlib.config import Config, check_ranges, register
from detlib.data.build import build_datasets
from detlib.data.coco import CocoDetection
from detlib.data.validation import AnnotationError
from detlib.engine.checkpoint import CheckpointError
from detlib.engine.checkpoint import load as load_checkpoint
from detlib.engine.trainer import resolve_device  # noqa: F401 - the tools' one way to pick a device
from detlib.modeling.proposals import check_proposal_ids

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
AMP = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # trainer.amp -> autocast dtype
RESULT_FIELDS = ("image_id", "category_id", "bbox", "score")

# Errors a user can cause with a bad path or file: reported as one line, no traceback.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, ValueError, KeyError, RuntimeError, CheckpointError,
               AnnotationError, OmegaConfBaseException)


class ToolError(ValueError):
    """Bad input to a tool; the message names the file, the field and the value."""


def cli(main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None, prog: str) -> int:
    """Run ``main``; a user error becomes ``prog: error: message`` on stderr and exit status 1."""
    try:
        return main(argv)
    except USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {msg}", file=sys.stderr)
        return 1


def read_json(path: str | Path, what: str = "file") -> object:
    """Parse a JSON file; a missing or malformed file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise ToolError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ToolError(f"{path}: not valid JSON ({e})") from e


def read_results(path: str | Path) -> list[dict]:
    """A COCO-results file (a list of ``{image_id, category_id, bbox: [x, y, w, h], score}``), shape-checked."""
    data = read_json(path, "detections file")
    if not isinstance(data, list):
        raise ToolError(f"{path}: a COCO results file is a JSON list of detections, got {type(data).__name__}")
    for i, r in enumerate(data):
        if not isinstance(r, dict):
            raise ToolError(f"{path}: entry {i} is not an object: {r!r}")
        missing = [f for f in RESULT_FIELDS if f not in r]
        if missing:
            raise ToolError(f"{path}: entry {i} has no field '{missing[0]}' (has {sorted(r)})")
        box = r["bbox"]
        if (not isinstance(box, list) or len(box) != 4
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box)):
            raise ToolError(f"{path}: entry {i}: field 'bbox' must be 4 numbers [x, y, w, h], got {box!r}")
        if not all(math.isfinite(v) for v in box):
            raise ToolError(f"{path}: entry {i}: field 'bbox' has a non-finite value {box!r}")
        if box[2] <= 0 or box[3] <= 0:  # pycocotools would silently ignore or mis-size it
            raise ToolError(f"{path}: entry {i}: field 'bbox' has width or height <= 0: {box!r}")
        if (isinstance(r["score"], bool) or not isinstance(r["score"], (int, float))
                or not math.isfinite(r["score"])):
            raise ToolError(f"{path}: entry {i}: field 'score' must be a finite number, got {r['score']!r}")
    return data


def check_results_file(path: str | Path, results: list[dict], gt_images: set[int], gt_cats: set[int]) -> None:
    """Unknown image or category ids are an error naming the file and the first offending entry."""
    for field, known in (("image_id", gt_images), ("category_id", gt_cats)):
        bad = [(i, r[field]) for i, r in enumerate(results) if r[field] not in known]
        if bad:
            i, value = bad[0]
            raise ToolError(f"{path}: entry {i}: {field} {value!r} is not in the ground truth "
                            f"({len(bad)} entries with unknown {field}s)")


def _parse_overrides(overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split ``key=value`` overrides into config-group choices (``data=coco``) and dotted keys."""
    groups, keys = [], []
    for o in overrides:
        if "=" not in o:
            raise ToolError(f"config override must be key=value, got {o!r}")
        key = o.split("=", 1)[0].lstrip("+~")
        (groups if "." not in key and (CONFIGS / key).is_dir() else keys).append(o)
    return groups, keys


def load_run_config(run_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The run's resolved config (its ``run.json``; ``.hydra/config.yaml`` for older runs), with optional
    overrides on top.

    A group choice (``data=coco``) replaces that whole node with the group's yaml, composed by
    Hydra from ``configs/``; a dotted key (``data.root=/x``) changes one value of the saved config.
    """
    record = Path(run_dir) / "run.json"
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if record.is_file():  # the config the run started with; .hydra/ is rewritten by every launch in the folder
        data = read_json(record, "run record")
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise ToolError(f"{record}: not a detlib run record (no 'config' object)")
        cfg = OmegaConf.create(data["config"])
    elif path.is_file():
        cfg = OmegaConf.load(path)
    else:
        raise ToolError(f"not a run directory (no run.json or .hydra/config.yaml): {run_dir}")
    groups, keys = _parse_overrides(overrides)
    if groups:
        register()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            composed = compose("train", overrides=groups)
        for o in groups:
            key = o.split("=", 1)[0].lstrip("+~")
            cfg[key] = composed[key]
    cfg.merge_with_dotlist(keys)
    return cfg


TRUSTED_TARGETS = ("detlib.", "torch.", "torchvision.")


def check_targets(cfg: DictConfig) -> None:
    """A run folder is data: its config may only instantiate detlib, torch and torchvision classes.

    Hydra's ``instantiate`` calls whatever ``_target_`` names, so a crafted ``run.json`` could otherwise
    run code (``builtins.open``, ...). Extensions of your own: ``DETLIB_TRUSTED_TARGETS=mypkg.,other.``.
    """
    extra = tuple(p for p in os.environ.get("DETLIB_TRUSTED_TARGETS", "").split(",") if p)
    for section in ("model", "loss", "rpn_loss"):
        node = OmegaConf.to_container(cfg.get(section), resolve=False) if cfg.get(section) is not None else {}
        for key, value in flatten_targets(node, section):
            if not isinstance(value, str) or not value.startswith(TRUSTED_TARGETS + extra):
                raise ToolError(f"run config: {key} = {value!r} is not a detlib, torch or torchvision class; "
                                "refusing to instantiate it (set DETLIB_TRUSTED_TARGETS=PREFIX. if it is yours)")


def flatten_targets(node: object, prefix: str) -> list[tuple[str, object]]:
    """Every ``_target_`` under ``node``, with its dotted key."""
    if isinstance(node, dict):
        out = [(f"{prefix}._target_", node["_target_"])] if "_target_" in node else []
        return out + [t for k, v in node.items() for t in flatten_targets(v, f"{prefix}.{k}")]
    if isinstance(node, list):
        return [t for i, v in enumerate(node) for t in flatten_targets(v, f"{prefix}.{i}")]
    return []


def build_from_run(cfg: DictConfig) -> tuple[nn.Module, CocoDetection]:
    """``(model, val_set)`` as ``train.py`` builds them; the model has fresh weights.

    Both splits are built (``build_datasets``), as in training: the class count comes from the data.
    A relative ``data.root`` is taken from the current folder (``train.py`` took it from where it was
    launched); pass ``--config-overrides data.root=...`` if that differs.
    """
    register()
    check_targets(cfg)
    typed: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), cfg))
    check_ranges(typed)
    train_set, val_set = build_datasets(typed.data)
    box_loss, rpn_box_loss = instantiate(cfg.loss), instantiate(cfg.rpn_loss)
    model = instantiate(cfg.model, num_classes=train_set.num_classes, box_loss=box_loss, rpn_box_loss=rpn_box_loss)
    check_proposal_ids(model, val=val_set.ids)  # Fast R-CNN with a proposals file must cover the val images
    return model, val_set


def load_weights(model: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint's ``model`` state into ``model``; returns the checkpoint (iteration, meta, ...)."""
    state = load_checkpoint(path)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {path} does not fit the run's model: {str(e).splitlines()[0]}") from e
    return state


def write_json(path: str | Path, obj: object) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")
    return path
