"""The run folder has one owner (detlib.runs): one spelling of its file names, one identity that the relaunch
check and compare_runs' groups both read."""

from __future__ import annotations

import ast
import copy
import json
import re
from pathlib import Path

from omegaconf import OmegaConf

from detlib import runs
from detlib.runs.groups import group_runs
from detlib.runs.results import load_run

from .conftest import ROOT, compose_cfg

# The run folder's names that only detlib/runs/layout.py spells; the folders' names are compared whole.
FILE_NAMES = ("run.json", "metrics.json", "metrics.jsonl", "metrics.csv", "eval_detail.json", "detections.json",
              "diverged.json", "last.pt", ".lock")
FOLDER_NAMES = ("checkpoints", "tb")


def _sources() -> list[Path]:
    return sorted([*(ROOT / "detlib").rglob("*.py"), *(ROOT / "tools").glob("*.py"), ROOT / "train.py"])


def _string_constants(tree: ast.AST) -> list[ast.Constant]:
    """Every string constant of a module but its docstrings (prose may name the files)."""
    docs = {id(n.body[0].value) for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_only_the_run_folder_module_spells_its_file_names():
    found = []
    for path in _sources():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "detlib/runs/layout.py":
            continue
        for node in _string_constants(ast.parse(path.read_text())):
            names = [n for n in FILE_NAMES if re.search(rf"(?<![\w.]){re.escape(n)}(?!\w)", node.value)] + [
                n for n in FOLDER_NAMES if node.value == n]
            found += [f"{rel}:{node.lineno}: {node.value!r}" for _ in names[:1]]
    assert not found, "spell these with detlib.runs' names:\n" + "\n".join(found)


def _set(config: dict, key: str, value: object) -> None:
    *parents, last = key.split(".")
    node = config
    for p in parents:
        node = node[p]
    node[last] = value


def _changed(value: object) -> object:
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, list):
        return [*value, value[-1] if value else 1]
    return f"{value}-changed"


def _run(folder: Path, config: dict) -> tuple[dict, Path]:
    """A finished run of ``config`` as train.py records it."""
    ident = runs.identity(config, world_size=1, num_classes=4, data_fingerprints={"train": "a" * 64, "val": "b" * 64})
    record = runs.make_record(config, ident, overrides=[], choices={}, data_files={})
    folder.mkdir(parents=True)
    runs.write_record(folder, record)
    (folder / runs.METRICS).write_text(json.dumps({"AP": 0.5}))
    return record, folder


def test_compare_runs_groups_and_the_relaunch_check_agree_on_every_key_of_the_config(tmp_path):
    """Change one key of the composed config: a relaunch is refused exactly when compare_runs puts the two runs
    in two groups, but for the inference settings (allowed on relaunch, they change the metrics: two groups)
    and the seed (another run of the same set-up: refused, one group)."""
    config = OmegaConf.to_container(compose_cfg(), resolve=True, enum_to_str=True)
    base, base_dir = _run(tmp_path / "base", config)
    keys = sorted(runs.flatten(config))
    assert len(keys) > 100 and "loss._target_" in keys and "trainer.device" in keys
    disagree, free = [], []
    for i, key in enumerate(keys):
        other = copy.deepcopy(config)
        _set(other, key, _changed(runs.flatten(config)[key]))
        record, folder = _run(tmp_path / str(i), other)
        refused = bool(runs.diff(base["identity"], record["identity"]))
        split = len(group_runs([load_run(base_dir), load_run(folder)])) == 2
        inference = runs.record._under(key, runs.EVAL_ONLY)
        expected = (False, True) if inference else (True, False) if key == runs.SEED else (refused, refused)
        if (refused, split) != expected:
            disagree.append(f"{key}: relaunch refused {refused}, own group {split}")
        if not refused and not inference:
            free.append(key)
    assert not disagree, "\n".join(disagree)
    assert free and all(runs.ignored(k) for k in free), free  # what counts for neither: the IGNORED keys
    assert "trainer.device" in free and len(free) < len(keys) / 4


def test_a_run_recorded_before_a_key_was_added_reads_as_holding_its_old_value(tmp_path):
    """A record without ``trainer.ema_decay`` (runs before the EMA) continues under today's default (no EMA) and is
    one group with today's runs; a relaunch asking for an EMA is refused naming the key. A model without the
    key's section gets no key."""
    config = OmegaConf.to_container(compose_cfg(), resolve=True, enum_to_str=True)
    assert config["trainer"]["ema_decay"] is None and set(runs.ADDED_KEYS) <= set(runs.flatten(config))
    today, today_dir = _run(tmp_path / "today", config)
    old, old_dir = _run(tmp_path / "old", config)
    for key in runs.ADDED_KEYS:
        del old["eval" if runs.record._under(key, runs.EVAL_ONLY) else "identity"][key]
    (old_dir / runs.RECORD).write_text(json.dumps(old))
    recorded = runs.read_record(old_dir)
    assert recorded["identity"]["data.exif_orientation"] == "ignore"  # how runs before the switch read pixels
    with_apply = {**today["identity"], "data.exif_orientation": "ignore"}
    runs.check(recorded, with_apply, old_dir)  # continues: no difference
    assert len(group_runs([load_run(old_dir), load_run(today_dir)])) == 2  # 'apply' is another set-up
    with_ema = {**with_apply, "trainer.ema_decay": 0.99}
    try:
        runs.check(recorded, with_ema, old_dir)
    except runs.RunIdentityError as e:
        assert "trainer.ema_decay: None -> 0.99" in str(e) and "exif" not in str(e)
    else:
        raise AssertionError("a relaunch with an EMA continued a run recorded without one")
    assert "trainer.ema_decay" not in runs.upgrade({"model.backbone.name": "x"})


def test_an_added_inference_key_upgrades_the_records_eval_settings_not_its_identity(tmp_path):
    """``model.roi_head.variance_voting`` (an ``EVAL_ONLY`` key added later): a record from before it reads as
    evaluated without voting and is one group with today's runs; the identity never holds it."""
    config = OmegaConf.to_container(compose_cfg(), resolve=True, enum_to_str=True)
    _, today_dir = _run(tmp_path / "today", config)
    old, old_dir = _run(tmp_path / "old", config)
    for key in ("model.roi_head.variance_voting", "model.roi_head.voting_sigma_t"):
        assert key in old["eval"] and key not in old["identity"]
        del old["eval"][key]
    (old_dir / runs.RECORD).write_text(json.dumps(old))
    recorded = runs.read_record(old_dir)
    assert recorded["eval"]["model.roi_head.variance_voting"] is False
    assert "model.roi_head.variance_voting" not in recorded["identity"]
    assert len(group_runs([load_run(old_dir), load_run(today_dir)])) == 1
