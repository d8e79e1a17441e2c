"""The writers the loop writes its scalars through (detlib/engine/writers.py), chosen in config."""

from __future__ import annotations

import csv
import json
import math

import pytest
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlib.config import check_ranges
from detlib.engine.writers import CsvWriter, JsonlWriter, TensorBoardWriter, open_writers

from .conftest import compose_cfg


class Recorder:
    """A writer of one's own: a class with ``write`` and ``close``, nothing else."""

    seen: list = []

    def __init__(self, run_dir, start, prefix: str = "") -> None:
        self.prefix = prefix

    def write(self, step, scalars, it_per_s=None):
        Recorder.seen.append((step, {self.prefix + k: v for k, v in scalars.items()}, it_per_s))

    def close(self):
        Recorder.seen.append("closed")


def test_the_default_writers_are_tensorboard_and_jsonl(tmp_path):
    typed = OmegaConf.to_object(compose_cfg())
    check_ranges(typed)
    writers = open_writers(typed.writer, tmp_path, 0)
    assert [type(w) for w in writers.writers] == [TensorBoardWriter, JsonlWriter]
    writers.write(2, {"train/loss": 1.5, "val/APl": None}, it_per_s=3.0)
    writers.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert line["iteration"] == 2 and line["it_per_s"] == 3.0 and line["val/APl"] is None
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert ea.Scalars("train/loss")[0].value == 1.5 and math.isnan(ea.Scalars("val/APl")[0].value)
    assert "it_per_s" not in ea.Tags()["scalars"]  # TensorBoard's events carry their own wall time
    assert open_writers(OmegaConf.to_object(compose_cfg("writer=[jsonl]")).writer, tmp_path / "b").tensorboard is None


def _csv_rows(path):
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_csv_writer_is_one_override_away(tmp_path):
    typed = OmegaConf.to_object(compose_cfg("+writer=csv"))
    check_ranges(typed)
    writers = open_writers(typed.writer, tmp_path, 0)
    assert [type(w) for w in writers.writers] == [TensorBoardWriter, JsonlWriter, CsvWriter]
    writers.write(2, {"train/loss": 1.5, "val/APl": None}, it_per_s=3.0)
    writers.close()
    assert [(r["iteration"], r["tag"], r["value"]) for r in _csv_rows(tmp_path / "metrics.csv")] == [
        ("2", "train/loss", "1.5"), ("2", "val/APl", ""), ("2", "it_per_s", "3.0")]


@pytest.mark.parametrize("kind", [JsonlWriter, CsvWriter])
def test_a_resumed_run_writes_each_step_once(tmp_path, kind):
    """A run killed after step 6 resumes from its checkpoint at 4: 6 is written again, once."""
    w = kind(tmp_path, 0)
    for it in (2, 4, 6):
        w.write(it, {"train/loss": 1.0 / it})
    w = kind(tmp_path, 4)
    w.write(6, {"train/loss": 0.5})
    if kind is JsonlWriter:
        steps = [json.loads(line)["iteration"] for line in w.path.read_text().splitlines()]
    else:
        steps = [int(r["iteration"]) for r in _csv_rows(w.path)]
    assert steps == [2, 4, 6]


def test_a_writer_of_ones_own_is_a_class_and_a_config_entry(tmp_path):
    Recorder.seen = []
    specs = {"mine": {"_target_": f"{__name__}.Recorder", "_partial_": True, "prefix": "x/"}}
    writers = open_writers(specs, tmp_path, 0)
    writers.write(3, {"val/AP": 0.5})
    writers.close()
    assert Recorder.seen == [(3, {"x/val/AP": 0.5}, None), "closed"]


def test_writer_keys_are_checked_like_any_component():
    with pytest.raises(ValueError, match=r"unknown key writer\.jsonl\.run_dir \(not a config key: it comes from the run"):
        check_ranges(OmegaConf.to_object(compose_cfg("+writer.jsonl.run_dir=x")))
    with pytest.raises(ValueError, match=r"unknown key writer\.jsonl\.sep \(valid: none\)"):
        check_ranges(OmegaConf.to_object(compose_cfg("+writer.jsonl.sep=x")))
    with pytest.raises(ValueError, match=r"writer\.mine must be a writer from configs/writer"):
        check_ranges(OmegaConf.to_object(compose_cfg("+writer.mine=1")))


def test_the_loop_writes_through_the_chosen_writers_only(data_root, tmp_path):
    """writer=[jsonl,csv]: no TensorBoard folder; the CSV holds what metrics.jsonl holds, train and val."""
    import dataclasses

    import torch

    from detlib.data.build import build_datasets
    from detlib.engine.build import build_model
    from detlib.engine.trainer import Job, train

    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.progress=false", "trainer.device=cpu",
                      "writer=[jsonl,csv]")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    torch.manual_seed(0)
    typed = dataclasses.replace(typed, trainer=dataclasses.replace(typed.trainer, max_iters=2, log_period=1))
    train(Job(build_model(cfg, train_set.num_classes), train_set, val_set, typed, tmp_path))
    assert not (tmp_path / "tb").exists()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    keys = {k for r in lines for k in r}
    assert [r["iteration"] for r in lines] == [1, 2, 2] and {"loss/total", "it_per_s", "val/AP"} <= keys
    from_jsonl = {(r["iteration"], k, v) for r in lines for k, v in r.items() if k not in ("iteration", "time")}
    from_csv = {(int(r["iteration"]), r["tag"], None if r["value"] == "" else float(r["value"]))
                for r in _csv_rows(tmp_path / "metrics.csv")}
    assert from_csv == from_jsonl  # no loop edit: the CSV writer gets what every writer gets
