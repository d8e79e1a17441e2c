"""A run's identity and its record, ``run.json``.

Hydra rewrites ``.hydra/config.yaml`` every time a command is launched in a folder, so those files
say what the *last* command asked for, not what produced the results there. detlib therefore writes
its own record once, when a run starts in an empty folder, and checks every later launch against it:

* ``identity(cfg, ...)``: the whole resolved config, flattened to dotted keys (``flatten``), minus the keys
  that cannot change the result (``IGNORED``: device, progress bar, logging and checkpoint periods, data
  paths, ...) and minus the inference-only keys (``EVAL_ONLY``: score threshold, NMS, max dets), plus
  what the config alone does not say: world size, number of classes, and a fingerprint of the
  annotation files (so the same data under another path is the same run, other data is not).
* ``run.json``: ``{identity, eval, config, overrides, choices, data_files, classes, created, host, argv}``
  (``classes``: the model's labels 1..K as ``{"id", "name"}`` of the training file's categories: the
  dataset metadata a trained model is used with, ``class_names``/``label_to_cat``), written once;
  ``train.py`` checks a relaunch against it (``check``), ``compare_runs.py`` groups runs by
  ``comparison_identity``, the tools rebuild a model from it and TensorBoard's HParams table reads it.

These two uses of the identity, a relaunch check and the groups of a comparison, read one list of keys
that don't count (``IGNORED``) and differ only where they must: inference settings (``EVAL_ONLY``) may
change when a run continues but change its metrics, so they split groups; the seed makes another run,
and groups are what runs of several seeds share (compared seed by seed).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from detlib.runs.layout import HYDRA_DIR, RECORD

FORMAT = 1

# Keys that say how a run is executed or logged, never what it computes (``writer``: where its scalars go;
# ``eval.metrics``: metrics scored beside COCO's, which they leave as they are).
# ``hydra`` and ``experiment`` are not config keys (Hydra's own node; the preset that chose values) but name
# launch overrides.
IGNORED = (
    "trainer.device", "trainer.progress", "trainer.log_period", "trainer.resume", "trainer.num_threads",
    "trainer.checkpoint_period", "trainer.keep_last", "trainer.channels_last", "trainer.cudnn_benchmark",
    "trainer.eval_period", "data.num_workers", "data.root", "data.train_ann", "data.train_images",
    "data.val_ann", "data.val_images", "eval.backend", "eval.metrics", "writer", "hydra", "experiment",
)
# Keys that change the evaluation only (inference thresholds): may differ on resume, and are named.
EVAL_ONLY = (
    "eval.max_dets", "eval.batch_size", "model.roi_head.score_thresh", "model.roi_head.nms_thresh",
    "model.roi_head.detections_per_img", "model.rpn.pre_nms_top_n_test", "model.rpn.post_nms_top_n_test",
    "model.roi_head.variance_voting", "model.roi_head.voting_sigma_t",
)
# Keys added after runs were first recorded, each with the value that reproduces what a run recorded without it
# computed. A record that lacks one is read as holding that value (as detectron2 upgrades an old config), so a
# new key with a backward-compatible default never orphans the runs already made; another value is a
# difference like any other. Add a line here with every new config key that changes no result by default.
ADDED_KEYS: dict[str, object] = {
    "trainer.ema_decay": None,
    "data.exif_orientation": "ignore",  # runs before it read pixels as stored
    "model.roi_head.variance_voting": False,
    "model.roi_head.voting_sigma_t": 0.02,
}
SEED = "seed"  # part of the identity; a comparison groups runs that differ only in it, and pairs them by it


class RunIdentityError(RuntimeError):
    """A launch that does not match the run already in its folder; the message lists the differences."""


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def ignored(key: str) -> bool:
    """Is ``key`` (``trainer.device``, or an override's ``+key``) one of the execution-only ``IGNORED`` keys?"""
    return _under(key.lstrip("+~"), IGNORED)


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay lists (compared as values)."""
    if not isinstance(node, Mapping) or not node:
        return {prefix: node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def upgrade(ident: Mapping, eval_only: bool = False) -> dict:
    """``ident`` with every ``ADDED_KEYS`` key it lacks, at the value runs before that key computed with (only
    where the key's section exists: a model without an RoI head gets no RoI-head key). ``ident``: a record's
    identity, which takes the added keys but the ``EVAL_ONLY`` ones, or with ``eval_only`` its ``eval``
    settings, which take only those."""
    out = dict(ident)
    for key, value in ADDED_KEYS.items():
        section = key.rpartition(".")[0]
        if _under(key, EVAL_ONLY) == eval_only and key not in out and any(k.startswith(section + ".") for k in ident):
            out[key] = value
    return dict(sorted(out.items()))


def fingerprint(dataset: object) -> str:
    """sha256 of a dataset's annotations: the JSON file's bytes, or (data converted in memory, e.g.
    Pascal VOC) of its COCO dict. Images are not read: that would cost a full decode of the data."""
    ann = Path(getattr(dataset, "ann_file", ""))
    if ann.suffix == ".json" and ann.is_file():
        return file_fingerprint(ann)
    return hashlib.sha256(json.dumps(dataset.coco.dataset, sort_keys=True, default=str).encode()).hexdigest()


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes: ``fingerprint`` of a dataset read from that JSON file, without building it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def identity(config: Mapping, *, world_size: int, num_classes: int, data_fingerprints: Mapping[str, str]) -> dict:
    """What defines a run's result, as flat ``{dotted key: value}`` (see the module docstring).

    ``config``: the resolved config as plain containers (``OmegaConf.to_container(cfg, resolve=True)``).
    """
    flat = {k: v for k, v in flatten(config).items() if not _under(k, IGNORED + EVAL_ONLY)}
    flat |= {"world_size": world_size, "num_classes": num_classes}
    flat |= {f"data.fingerprint.{k}": v for k, v in data_fingerprints.items()}
    return dict(sorted(flat.items()))


def tells_groups_apart(key: str) -> bool:
    """Can an override of ``key`` name a comparison's group? Not an execution key, nor the seed (runs of one
    set-up differ in it)."""
    return not ignored(key) and key.lstrip("+~") != SEED


def comparison_identity(record: Mapping, used_eval: Mapping | None = None) -> dict:
    """What ``compare_runs`` groups a run by: its recorded identity without the seed, plus the inference
    settings its metrics were computed with (``used_eval``: ``eval_detail.json``'s ``eval_settings``, else the
    record's ``eval``): runs at other settings are not one set-up. ``IGNORED`` keys there (``eval.backend``, which
    evaluator scored it) never split a group."""
    out = dict(record["identity"]) | dict(record.get("eval") or {}) | dict(used_eval or {})
    out.pop(SEED, None)
    return {k: v for k, v in out.items() if not ignored(k)}  # eval_detail.json's eval.backend: same numbers


def eval_settings(config: Mapping) -> dict:
    """The inference-only keys of ``config`` (flat): they may change between launches of one run."""
    return {k: v for k, v in flatten(config).items() if _under(k, EVAL_ONLY)}


def diff(old: Mapping, new: Mapping) -> list[str]:
    """``key: old -> new`` for every key whose value differs (a key missing on one side shows ``<unset>``)."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, "<unset>"), new.get(k, "<unset>")
        if a != b:
            out.append(f"{k}: {a} -> {b}")
    return out


def make_record(config: Mapping, ident: Mapping, *, overrides: list[str], choices: Mapping[str, str],
                data_files: Mapping[str, str], classes: Sequence[Mapping] | None = None,
                hydra_config: str | None = None) -> dict:
    """``classes``: ``[{"id": category id, "name": name}]`` in label order (label k is ``classes[k - 1]``).
    ``hydra_config``: the text of ``.hydra/config.yaml`` as Hydra wrote it (interpolations unresolved), which
    ``restore_hydra_files`` puts back after a refused launch."""
    return {
        "format": FORMAT,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "argv": list(sys.argv),
        "overrides": list(overrides),
        "choices": dict(choices),
        "identity": dict(ident),
        "eval": eval_settings(config),
        "data_files": dict(data_files),
        "classes": [dict(c) for c in classes or []],
        "config": config,
    } | ({"hydra_config": hydra_config} if hydra_config is not None else {})


def read_record(run_dir: str | Path, need: str = "identity") -> dict | None:
    """The run's ``run.json``; None if there is none. An unreadable one, or one without the object ``need``
    (``identity``; ``config`` to rebuild the run), is an error naming it."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunIdentityError(f"{path}: unreadable run record ({e}); this folder's results cannot be "
                               "attributed to a set-up: move it away or start a new run directory") from e
    if not isinstance(record, dict) or not isinstance(record.get(need), dict):
        raise RunIdentityError(f"{path}: not a detlib run record (no '{need}' object)")
    if isinstance(record.get("identity"), dict):
        record["identity"] = upgrade(record["identity"])
    if isinstance(record.get("eval"), dict):
        record["eval"] = upgrade(record["eval"], eval_only=True)
    return record


def write_record(run_dir: str | Path, record: Mapping) -> Path:
    """Write ``run.json`` atomically; refuses to replace an existing one (a run's identity is written once)."""
    path = Path(run_dir) / RECORD
    tmp = path.with_name(f".{RECORD}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    try:
        os.link(tmp, path)  # fails if run.json exists: never overwrite another run's record
    finally:
        tmp.unlink(missing_ok=True)
    return path


def check(record: Mapping, ident: Mapping, run_dir: str | Path) -> None:
    """Refuse a launch whose identity differs from the run recorded in ``run_dir``, naming only the
    differing keys."""
    diffs = diff(record["identity"], ident)
    if diffs:
        raise RunIdentityError(
            f"{Path(run_dir) / RECORD}: this folder holds a run with a different set-up:\n  "
            + "\n  ".join(diffs)
            + "\nits results belong to the recorded set-up. Run the new set-up in a new folder "
              "(add trainer.resume=new, or drop hydra.run.dir / use another hydra.sweep.dir), or launch with "
              "the recorded values.")


def recorded_classes(record: Mapping) -> tuple[dict[int, str], dict[int, int]] | None:
    """The dataset metadata a trained model is used with, as the record keeps it: ``({label: name},
    {label: category id})`` for the labels 1..K; None for a run recorded before ``classes`` were."""
    classes = record.get("classes")
    if not classes:
        return None
    return ({k: str(c["name"]) for k, c in enumerate(classes, 1)}, {k: int(c["id"]) for k, c in enumerate(classes, 1)})


def hydra_config_text(run_dir: str | Path) -> str | None:
    """The folder's ``.hydra/config.yaml`` as Hydra wrote it for this launch; None without one."""
    path = Path(run_dir) / HYDRA_DIR / "config.yaml"
    return path.read_text() if path.is_file() else None


def restore_hydra_files(run_dir: str | Path, record: Mapping) -> None:
    """Put back the ``.hydra`` files a refused launch made Hydra rewrite, from the record."""
    from omegaconf import OmegaConf

    folder = Path(run_dir) / HYDRA_DIR
    if not folder.is_dir():
        return
    text = record.get("hydra_config")  # Hydra's own text (interpolations unresolved), when the record kept it
    (folder / "config.yaml").write_text(text or OmegaConf.to_yaml(OmegaConf.create(record["config"])))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(record["overrides"]))))


def hparams(record: Mapping) -> dict:
    """The flat parameters TensorBoard's HParams table compares runs by, read from the run's record: the keys
    this launch overrode (in a sweep: what differs between its runs), then loss, seed, lr and model, the loss's
    parameters, batch size, data, max_iters and noise, then every other key of the identity (but the
    ``_target_``-like keys and the data's fingerprints). Every run writes them all, so whatever key any run
    under a log folder overrode has a value in every row, and TensorBoard, which ticks the columns whose values
    differ between the runs first, shows it (``dashboard.log_hparams``)."""
    ident, choices = record["identity"], record.get("choices", {})
    loss = {k[len("loss."):]: v for k, v in ident.items() if k.startswith("loss.") and k != "loss._target_"}
    out = {"loss": choices.get("loss", str(ident.get("loss._target_", "?")).rsplit(".", 1)[-1])}
    out |= {f"loss.{k}": v for k, v in loss.items()}
    out |= {"lr": ident.get("trainer.lr"), "batch_size": ident.get("data.batch_size"), "seed": ident.get("seed"),
            "data": ident.get("data.name"), "max_iters": ident.get("trainer.max_iters"),
            "model": choices.get("model", "?"),
            "rpn_loss": choices.get("loss@rpn_loss", str(ident.get("rpn_loss._target_", "?")).rsplit(".", 1)[-1])}
    out |= {k: v for k, v in ident.items() if k.startswith("data.noise.")}
    short = {"trainer.lr": "lr", "data.batch_size": "batch_size", "trainer.max_iters": "max_iters",
             "loss@rpn_loss": "rpn_loss"}
    out |= {k: v for k, v in ident.items() if k not in short and k != "data.name" and k not in out
            and not k.rsplit(".", 1)[-1].startswith("_") and not k.startswith("data.fingerprint.")}
    first = []
    for override in record.get("overrides", []):
        key = short.get(k := override.split("=", 1)[0].lstrip("+~"), k)
        if key in out or key in ident:
            out.setdefault(key, ident.get(key))
            first.append(key)
    order = list(dict.fromkeys(first + list(LEADING) + list(out)))
    return {k: out[k] for k in order}


LEADING = ("loss", "seed", "lr", "model")


