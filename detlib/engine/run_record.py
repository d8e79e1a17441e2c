"""A run's identity, its record (``run.json``) and its lock (``.lock``).

Hydra rewrites ``.hydra/config.yaml`` every time a command is launched in a folder, so those files
say what the *last* command asked for, not what produced the results there. detlib therefore writes
its own record once, when a run starts in an empty folder, and checks every later launch against it:

* ``identity(cfg, ...)``: the whole resolved config, flattened to dotted keys, minus the keys that
  cannot change the result (``IGNORED``: device, progress bar, logging and checkpoint periods, data
  paths, ...) and minus the inference-only keys (``EVAL_ONLY``: score threshold, NMS, max dets), plus
  what the config alone does not say: world size, number of classes, and a fingerprint of the
  annotation files (so the same data under another path is the same run, other data is not).
* ``run.json``: ``{identity, eval, config, overrides, choices, data_files, classes, created, host, argv}``
  (``classes``: the model's labels 1..K as ``{"id", "name"}`` of the training file's categories),
  written once; ``compare_runs.py``, the tools and TensorBoard's HParams table read it.
* ``RunLock``: an ``flock`` on ``RUN/.lock`` held for the run's life, naming its owner (pid, host).
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

RECORD = "run.json"
LOCK = ".lock"
FORMAT = 1

# Keys that say how a run is executed or logged, never what it computes.
IGNORED = (
    "trainer.device", "trainer.progress", "trainer.log_period", "trainer.resume", "trainer.num_threads",
    "trainer.checkpoint_period", "trainer.keep_last", "trainer.channels_last", "trainer.cudnn_benchmark",
    "trainer.eval_period", "data.num_workers", "data.root", "data.train_ann", "data.train_images",
    "data.val_ann", "data.val_images", "eval.backend",
)
# Keys that change the evaluation only (inference thresholds): may differ on resume, and are named.
EVAL_ONLY = (
    "eval.max_dets", "eval.batch_size", "model.roi_head.score_thresh", "model.roi_head.nms_thresh",
    "model.roi_head.detections_per_img", "model.rpn.pre_nms_top_n_test", "model.rpn.post_nms_top_n_test",
)


class RunIdentityError(RuntimeError):
    """A launch that does not match the run already in its folder; the message lists the differences."""


class RunDirInUse(RuntimeError):
    """Another live process holds the run folder's lock."""


def _under(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay lists (compared as values)."""
    if not isinstance(node, Mapping) or not node:
        return {prefix: node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def fingerprint(dataset: object) -> str:
    """sha256 of a dataset's annotations: the JSON file's bytes, or (data converted in memory, e.g.
    Pascal VOC) of its COCO dict. Images are not read: that would cost a full decode of the data."""
    ann = Path(getattr(dataset, "ann_file", ""))
    h = hashlib.sha256()
    if ann.suffix == ".json" and ann.is_file():
        with open(ann, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(json.dumps(dataset.coco.dataset, sort_keys=True, default=str).encode())
    return h.hexdigest()


def identity(config: Mapping, *, world_size: int, num_classes: int, data_fingerprints: Mapping[str, str]) -> dict:
    """What defines a run's result, as flat ``{dotted key: value}`` (see the module docstring).

    ``config``: the resolved config as plain containers (``OmegaConf.to_container(cfg, resolve=True)``).
    """
    flat = {k: v for k, v in flatten(config).items() if not _under(k, IGNORED + EVAL_ONLY)}
    flat |= {"world_size": world_size, "num_classes": num_classes}
    flat |= {f"data.fingerprint.{k}": v for k, v in data_fingerprints.items()}
    return dict(sorted(flat.items()))


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
                data_files: Mapping[str, str], classes: Sequence[Mapping] | None = None) -> dict:
    """``classes``: ``[{"id": category id, "name": name}]`` in label order (label k is ``classes[k - 1]``)."""
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
    }


def read_record(run_dir: str | Path) -> dict | None:
    """The run's ``run.json``; None if there is none. An unreadable one is an error naming it."""
    path = Path(run_dir) / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunIdentityError(f"{path}: unreadable run record ({e}); this folder's results cannot be "
                               "attributed to a set-up: move it away or start a new run directory") from e
    if not isinstance(record, dict) or not isinstance(record.get("identity"), dict):
        raise RunIdentityError(f"{path}: not a detlib run record (no 'identity' object)")
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


def foreign_files(run_dir: str | Path) -> list[str]:
    """Checkpoints and TensorBoard event files already in ``run_dir`` (another run's results)."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "checkpoints").glob("*.pt")] if (run_dir / "checkpoints").is_dir() else []
    found += list((run_dir / "tb").glob("events.out.tfevents.*")) if (run_dir / "tb").is_dir() else []
    found += [run_dir / n for n in ("metrics.json", RECORD) if (run_dir / n).is_file()]
    return sorted(str(p.relative_to(run_dir)) for p in found)


def restore_hydra_files(run_dir: str | Path, record: Mapping) -> None:
    """Put back the ``.hydra`` files a refused launch made Hydra rewrite, from the record."""
    from omegaconf import OmegaConf

    folder = Path(run_dir) / ".hydra"
    if not folder.is_dir():
        return
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(record["config"])))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(record["overrides"]))))


class RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` for the life of the process that trains in ``RUN``.

    The kernel drops the lock when the process dies (even SIGKILL), so a crashed run never leaves
    its folder locked. The file names the owner so a refused launch can say who holds it.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 4096).decode(errors="replace").strip() or "unknown owner"
            os.close(fd)
            raise RunDirInUse(f"run directory {self.path.parent} is in use by another run ({owner}; lock file "
                              f"{self.path}). Two runs never share a folder: wait for it, stop it, or use "
                              "another folder.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                     f"{datetime.datetime.now().isoformat(timespec='seconds')}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def hparams(record: Mapping) -> dict:
    """The flat parameters TensorBoard's HParams table compares runs by, read from the run's record, in the
    order its columns should show: the keys this launch overrode (in a sweep: what differs between its runs),
    then loss, seed, lr and model, then the rest (the table shows the first few by default)."""
    ident, choices = record["identity"], record.get("choices", {})
    loss = {k[len("loss."):]: v for k, v in ident.items() if k.startswith("loss.") and k != "loss._target_"}
    out = {"loss": choices.get("loss", str(ident.get("loss._target_", "?")).rsplit(".", 1)[-1])}
    out |= {f"loss.{k}": v for k, v in loss.items()}
    out |= {"lr": ident.get("trainer.lr"), "batch_size": ident.get("data.batch_size"), "seed": ident.get("seed"),
            "data": ident.get("data.name"), "max_iters": ident.get("trainer.max_iters"),
            "model": choices.get("model", "?")}
    out |= {k: v for k, v in ident.items() if k.startswith("data.noise.")}
    short = {"trainer.lr": "lr", "data.batch_size": "batch_size", "trainer.max_iters": "max_iters"}
    first = []
    for override in record.get("overrides", []):
        key = short.get(k := override.split("=", 1)[0].lstrip("+~"), k)
        if key in out or key in ident:
            out.setdefault(key, ident.get(key))
            first.append(key)
    order = list(dict.fromkeys(first + list(LEADING) + list(out)))
    return {k: out[k] for k in order}


LEADING = ("loss", "seed", "lr", "model")


def leading_hparams(hparams: Mapping) -> list[str]:
    """The keys of ``hparams(record)`` up to the last of ``LEADING``: what the launch overrode, then loss,
    seed, lr and model; TensorBoard's HParams table shows these first."""
    keys = list(hparams)
    last = max((keys.index(k) for k in LEADING if k in keys), default=-1)
    return keys[: last + 1]


NEW_RUN = "trainer.resume=new"  # the switch that starts over in a new folder instead of continuing


def run_dir(base: str = "outputs", overrides: Sequence[str] | None = None) -> str:
    """The run folder of a launch (Hydra resolver ``detlib_run_dir``): the newest unfinished run under
    ``base`` launched with exactly these ``overrides`` and not running now, so re-running the same command
    continues it (as detectron2's ``--resume``, but by default); otherwise, or with ``trainer.resume=new``,
    a new ``base/DATE/TIME`` folder."""
    from detlib import distributed as dist

    wanted = None if overrides is None else [str(o) for o in overrides]
    return dist.run_stamp(base, lambda: (None if wanted is None or NEW_RUN in wanted else
                                         unfinished_run(base, wanted)) or dist._claim(base))


def unfinished_run(base: str | Path, overrides: list[str]) -> str | None:
    """The newest ``base/DATE/TIME`` whose ``run.json`` records ``overrides``, without ``metrics.json``
    (unfinished) and not locked by a live process; None if there is none."""
    candidates = []
    for record_file in Path(base).glob(f"*/*/{RECORD}"):
        folder = record_file.parent
        if (folder / "metrics.json").exists() or _locked(folder / LOCK):
            continue
        try:
            record = json.loads(record_file.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("overrides") == overrides:
            candidates.append((record_file.stat().st_mtime, str(folder)))
    return max(candidates)[1] if candidates else None


def _locked(path: Path) -> bool:
    """Whether a live process holds ``RunLock`` on ``path`` (the lock itself is taken later, by train.py)."""
    if not path.exists():
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
