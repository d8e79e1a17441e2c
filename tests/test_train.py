"""End to end through train.py, as a user runs it: smoke run, multirun, and start-up errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlib.engine import dashboard
from detlib.evaluation.coco_eval import STAT_NAMES

from .conftest import run_train
from .fixtures import write_coco

TRAIN_TAGS = {"loss/total", "loss/cls", "loss/box_reg", "loss/rpn_cls", "loss/rpn_box_reg", "lr"}
VAL_TAGS = {f"val/{k}" for k in STAT_NAMES}


def scalars(run_dir: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_root) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("smoke")
    proc = run_train("experiment=smoke", f"data.root={data_root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc.stdout + proc.stderr


def test_smoke_run_writes_the_run_directory_contract(smoke_run):
    run_dir, _ = smoke_run
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "train.log").is_file() and "iter 6/6" in (run_dir / "train.log").read_text()
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert list(metrics) == list(STAT_NAMES)
    detail = json.loads((run_dir / "eval_detail.json").read_text())
    assert list(detail["ap_per_iou"]) == [f"{0.5 + 0.05 * i:.2f}" for i in range(10)]
    assert set(detail["per_class_ap"]) == {"rectangle", "ellipse", "triangle", "cross"}
    assert all(v is None or (isinstance(v, float) and 0 <= v <= 1) for v in metrics.values())


def test_smoke_run_writes_metrics_jsonl(smoke_run):
    run_dir, _ = smoke_run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss/total" in r]
    assert [r["iteration"] for r in train] == [2, 4, 6]  # every log_period, as TensorBoard
    assert all({"lr", "loss/box_reg", "it_per_s", "time"} <= set(r) for r in train)
    final = [r for r in records if "val/AP" in r][-1]
    assert final["iteration"] == 6
    assert final["val/AP"] == json.loads((run_dir / "metrics.json").read_text())["AP"]


def test_smoke_run_tensorboard_tags(smoke_run):
    run_dir, _ = smoke_run
    ea = scalars(run_dir)
    tags = set(ea.Tags()["scalars"])
    assert TRAIN_TAGS <= tags and VAL_TAGS <= tags
    shadow = {f"train/shadow/{k}" for k in ("smooth_l1", "huber", "l1", "l2", "giou", "smooth_l1_quadratic_frac",
                                            "huber_quadratic_frac")} | {"train/fg_iou"}
    assert shadow <= tags
    assert [e.step for e in ea.Scalars("train/shadow/l2")] == [2, 4, 6]  # every log_period, not every step
    assert all(0 <= e.value <= 1 for e in ea.Scalars("train/fg_iou"))
    assert {"val/loss", "val/loss_box_reg", "val/loss_cls"} <= tags
    assert [e.step for e in ea.Scalars("loss/total")] == [2, 4, 6]
    assert all(torch.isfinite(torch.tensor(e.value)) for e in ea.Scalars("loss/total"))
    p50, p90 = ea.Scalars("train/abs_residual_p50"), ea.Scalars("train/abs_residual_p90")
    assert all(0 <= a.value <= b.value for a, b in zip(p50, p90)) and len(p50) == 3
    assert {"val/tide/dAP_Loc", "val/tide/dAP_Miss", "val/tp_iou_mean"} <= tags


def test_smoke_run_dashboards(smoke_run):
    """The dashboards, read back from the event files."""
    run_dir, _ = smoke_run
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0,
                                                              "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    assert {"train/grad_norm/box_head", "train/grad_norm/total"} <= set(tags["scalars"])
    box, total = (ea.Scalars(f"train/grad_norm/{k}") for k in ("box_head", "total"))
    assert [e.step for e in box] == [2, 4, 6]
    assert all(0 < b.value <= t.value for b, t in zip(box, total))  # a part's norm is at most the whole's
    per_class = {t for t in tags["scalars"] if t.startswith("val/AP/")}
    assert per_class <= {f"val/AP/{c}" for c in ("rectangle", "ellipse", "triangle", "cross")}
    detail = json.loads((run_dir / "eval_detail.json").read_text())
    for name, v in detail["per_class_ap"].items():
        if v is not None:
            assert ea.Scalars(f"val/AP/{name}")[-1].value == pytest.approx(v)
    assert {"val/pr_curves", "val/detections"} <= set(tags["images"])
    pr = {t for t in tags["tensors"] if t.startswith("val/pr/")}  # TensorBoard's own PR-curve plugin, per class
    assert pr and pr <= {"val/pr/rectangle", "val/pr/ellipse", "val/pr/triangle", "val/pr/cross"}
    assert set(ea.PluginTagToContent("pr_curves")) == pr
    det = ea.Images("val/detections")[-1]
    assert det.step == 6 and det.width == 4 * (dashboard.TILE + 2) + 2  # four fixed val images side by side
    residuals = {f"train/residuals/{k}" for k in ("dx", "dy", "dw", "dh")}
    assert residuals | {"train/fg_iou_hist"} <= set(tags["histograms"])
    assert "val/per_class_AP/text_summary" in tags["tensors"]
    # The views open on the losses: TensorBoard groups the sorted tags by their first part, loss/ then lr, then
    # the train/ diagnostics and val/. The HParams table's row is a run of its own, tb/hparams: its session
    # start has every parameter (no experiment summary: TensorBoard would take one run's columns), its
    # scalars are the table's metrics, the final val/* (no one-point hparam/* charts).
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    assert not any(t.startswith("hparam/") for t in tags["scalars"])
    groups = sorted({t.split("/")[0] for kind in ("scalars", "histograms", "images") for t in tags[kind]})
    assert groups == ["loss", "lr", "train", "val"]
    assert not any(t.startswith("_hparams_/") for t in tags["tensors"])  # the run's curves are no session
    row = EventAccumulator(str(run_dir / "tb" / "hparams"), size_guidance={"scalars": 0, "tensors": 0})
    row.Reload()
    content = row.PluginTagToContent(metadata.PLUGIN_NAME)
    assert metadata.EXPERIMENT_TAG not in content
    start = HParamsPluginData.FromString(content[metadata.SESSION_START_INFO_TAG]).session_start_info
    assert {"loss", "seed", "lr", "model", "model.roi_head.target_outliers"} <= set(start.hparams)
    assert start.hparams["loss"].string_value == "smooth_l1" and start.hparams["max_iters"].number_value == 6
    assert sorted(row.Tags()["scalars"]) == sorted(VAL_TAGS)
    final = json.loads((run_dir / "metrics.json").read_text())["AP"]
    assert row.Scalars("val/AP")[-1].value == pytest.approx(final) == ea.Scalars("val/AP")[-1].value
    assert row.Scalars("val/AP")[-1].step == 6


def test_smoke_run_tags_put_the_losses_first_in_tensorboards_order(smoke_run):
    """Time Series and Scalars sort the tags (TensorBoard's natural order) and group them by the part before the
    first '/', the groups in that order, the first two expanded: the losses, then lr."""
    run_dir, _ = smoke_run
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    ea.Reload()
    tags = sorted(t for kind in ("scalars", "histograms", "images") for t in ea.Tags()[kind])
    assert list(dict.fromkeys(t.split("/", 1)[0] for t in tags)) == ["loss", "lr", "train", "val"]
    assert tags[:5] == ["loss/box_reg", "loss/cls", "loss/rpn_box_reg", "loss/rpn_cls", "loss/total"]


def test_the_hparams_table_has_a_column_for_what_any_run_overrode_ticked_where_runs_differ(smoke_run, tmp_path):
    """TensorBoard's HParams table takes its columns from every run's session start when no run wrote an
    experiment summary (else from the first such run it finds only), marks a column as differing when the
    runs' values differ and ticks the first five of (differing first, name). The smoke run is launched at the
    default target_outliers; a second row, of a launch that overrode it, is written beside it."""
    from tensorboard.plugins.hparams import backend_context, metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData
    from torch.utils.tensorboard import SummaryWriter

    from detlib import runs

    run_dir, _ = smoke_run
    record = runs.read_record(run_dir)
    key = "model.roi_head.target_outliers"
    other = record | {"identity": record["identity"] | {key: 0.4}, "overrides": record["overrides"] + [f"{key}=0.4"]}
    with SummaryWriter(str(tmp_path / "other" / runs.TB)) as w:
        dashboard.log_hparams(w, runs.hparams(other), {"AP": 0.5}, 6)
    content = {}
    for run in (run_dir, tmp_path / "other"):
        row = EventAccumulator(str(run / runs.TB / runs.HPARAMS_RUN), size_guidance={"scalars": 0})
        row.Reload()
        content[str(run)] = row.PluginTagToContent(metadata.PLUGIN_NAME)
        assert metadata.EXPERIMENT_TAG not in content[str(run)]
        assert "val/AP" in row.Tags()["scalars"] and all(t.startswith("val/") for t in row.Tags()["scalars"])
    start = HParamsPluginData.FromString(content[str(run_dir)][metadata.SESSION_START_INFO_TAG]).session_start_info
    assert start.hparams[key].number_value == 0.0  # written though the smoke run did not override it
    infos = backend_context.Context(None)._compute_hparam_infos(content)  # TensorBoard's own column choice
    experiment = backend_context.api_pb2.Experiment(hparam_infos=infos)
    backend_context._sort_and_reduce_to_hparams_limit(experiment)
    assert experiment.hparam_infos[0].name == key and experiment.hparam_infos[0].differs  # 0.0 and 0.4: ticked
    assert not any(h.differs for h in experiment.hparam_infos[1:])
    assert {"loss", "lr", "seed", "model", "batch_size"} <= {h.name for h in experiment.hparam_infos}


def test_smoke_run_prints_the_table(smoke_run):
    _, out = smoke_run
    assert "AP @[.50:.95]" in out and "AR maxDets 100" in out


def test_checkpoint_holds_the_full_state(smoke_run):
    run_dir, _ = smoke_run
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] == 6
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "meta", "sampler", "epoch"} <= set(state)
    assert {"python", "numpy", "torch", "cuda"} <= set(state["rng"])


@pytest.mark.slow
def test_multirun_two_jobs(tmp_path, data_root):
    proc = run_train("-m", "experiment=smoke", "trainer.max_iters=2", "loss=l1,huber", f"data.root={data_root}",
                     f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert len(jobs) == 2, jobs
    assert {j.name.split("_", 1)[1] for j in jobs} == {"loss=l1,trainer.max_iters=2", "loss=huber,trainer.max_iters=2"}
    for j in jobs:
        assert (j / "metrics.json").is_file() and (j / "checkpoints" / "last.pt").is_file()


@pytest.mark.slow
def test_loss_study_preset_compares_and_a_rerun_skips_finished_jobs_and_resumes_the_cut_off_one(tmp_path, data_root):
    """experiment=loss_study (shrunk) runs its sweep and the comparison; re-running the same
    command continues an interrupted study."""
    args = ("experiment=loss_study", "hydra.sweeper.params.loss='smooth_l1,huber'", "hydra.sweeper.params.seed='0'",
            f"data.root={data_root}", "data.synthetic.num_train=64", "data.synthetic.num_val=16",
            "data.batch_size=4", "trainer.max_iters=4", "trainer.warmup_iters=1", "trainer.checkpoint_period=1",
            "trainer.log_period=1", f"hydra.sweep.dir={tmp_path}")
    proc = run_train(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done, cut = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert done.name.startswith("0_") and "loss=smooth_l1,seed=0" in done.name
    assert cut.name.startswith("1_") and "loss=huber,seed=0" in cut.name
    table = (tmp_path / "comparison.md").read_text()  # written by the CompareRuns callback
    assert "loss=huber" in table and "loss=smooth_l1" in table and (tmp_path / "ap_bar.png").is_file()
    assert f"compare them: uv run tools/compare_runs.py {tmp_path}" in proc.stdout + proc.stderr  # SweepSummary
    metrics_done = (done / "metrics.json").read_text()
    # Cut the second job off after iteration 2, as a killed sweep leaves it.
    (cut / "metrics.json").unlink()
    ckpts = cut / "checkpoints"
    for p in ckpts.glob("model_*.pt"):
        if int(p.stem.split("_")[1]) > 2:
            p.unlink()
    (ckpts / "last.pt").unlink()
    (ckpts / "last.pt").hardlink_to(ckpts / "model_0000002.pt")

    again = run_train(*args)
    out = again.stdout + again.stderr
    assert again.returncode == 0, out[-3000:]
    assert "finished at iteration 4; skipping it" in out
    assert "resumed from" in out and "at iteration 2" in out
    assert (done / "metrics.json").read_text() == metrics_done
    assert (cut / "metrics.json").is_file() and (ckpts / "model_0000004.pt").is_file()
    assert [e.step for e in scalars(cut).Scalars("loss/total")] == [1, 2, 3, 4]  # no duplicated steps


@pytest.mark.slow
def test_relative_data_paths_from_another_directory_in_multirun(tmp_path):
    """Relative ``data.root`` is taken from where the user launched; each job writes only its own dir."""
    write_coco(tmp_path / "data", num_train=4, num_val=2)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*"))
    proc = run_train("-m", "data=coco", "data.root=data", "data.train_ann=train.json", "data.train_images=images",
                     "data.val_ann=val.json", "data.val_images=images", "data.batch_size=2", "model.min_size=64",
                     "model.max_size=96", "trainer.max_iters=2", "trainer.warmup_iters=1", "trainer.progress=false",
                     "trainer.device=cpu", "loss=l1,huber", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "sweep"]  # nothing written beside them
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "data").rglob("*")) == before
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [j.name.split("_", 1)[0] for j in jobs] == ["0", "1"]
    for j in jobs:
        assert (j / "metrics.json").is_file() and (j / "tb").is_dir()
        meta = torch.load(j / "checkpoints" / "last.pt", weights_only=False)["meta"]
        assert meta["data_files"]["train"] == str(tmp_path / "data" / "train.json")  # resolved from the launch dir


@pytest.mark.parametrize("args,needle", [
    (["loss=foo"], "smooth_l1"),
    (["loss=huber", "loss.delta=-0.5"], "delta must be > 0"),
    (["loss=smooth_l1", "loss.beta=-1"], "beta must be >= 0"),
    (["trainer.lr=abc"], "trainer.lr"),
    (["data=coco", "data.root=/nonexistent", "data.train_ann=a.json", "data.train_images=x",
      "data.val_ann=b.json", "data.val_images=y"], "/nonexistent"),
])
def test_bad_input_fails_at_start_with_a_clear_message(tmp_path, args, needle):
    proc = run_train(*args, f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize("args,needle", [
    (["model.roi_head.fg_iou_thresh=1.5"], "config: model.roi_head.fg_iou_thresh must be in [0, 1], got 1.5"),
    (["model.min_size=[0]"], "config: model.min_size.0 must be > 0, got 0"),
])
def test_model_ranges_fail_at_start_in_one_line_naming_the_key(tmp_path, args, needle):
    proc = run_train(*args, "trainer.device=cpu", f"hydra.run.dir={tmp_path}", timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [f"train.py: error: {needle}"]
    assert not (tmp_path / "checkpoints").exists()


def test_a_diverged_run_is_recorded_as_a_result_and_the_sweep_goes_on(tmp_path, data_root, monkeypatch):
    """trainer.on_nonfinite=record (stability sweeps): the first job's loss turns NaN at iteration 2."""
    monkeypatch.setenv("DETLIB_FAULT_RANK", "0")
    monkeypatch.setenv("DETLIB_FAULT_CALL", "2")  # counted over the sweep's process: only the first job is hit
    proc = run_train("-m", "experiment=smoke", f"data.root={data_root}", "trainer.device=cpu", "trainer.progress=false",
                     "loss=l1", "loss._target_=tests.faults.NaNOnRank", "trainer.on_nonfinite=record", "seed=0,1",
                     f"hydra.sweep.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, second = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert json.loads((first / "diverged.json").read_text())["reason"].startswith("non-finite loss at iteration 2")
    scored, finished = (json.loads((run / "metrics.json").read_text()) for run in (first, second))
    assert {v for v in scored.values() if v is not None} == {0.0}  # the AP collapse it is
    assert {k for k, v in scored.items() if v is None} == {k for k, v in finished.items() if v is None}  # as COCO
    assert not (second / "diverged.json").exists() and (second / "checkpoints" / "last.pt").is_file()
    rerun = run_train("experiment=smoke", f"data.root={data_root}", "trainer.device=cpu", "loss=l1",
                      "loss._target_=tests.faults.NaNOnRank", "trainer.on_nonfinite=record", "seed=0",
                      f"hydra.run.dir='{first}'")
    assert rerun.returncode == 0 and "diverged (diverged.json); skipping it" in rerun.stdout + rerun.stderr


@pytest.mark.parametrize("folder", ["/tmp/runs/2024-01-01/12-00-00", "/tmp/résultats/été 1", "/tmp/it's,a=run"])
def test_printed_continue_command_for_any_folder_pastes_into_a_shell_and_parses_in_hydra(folder):
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from train import hydra_quote

    arg = shlex.quote(f"hydra.run.dir={hydra_quote(folder)}")  # as continue_command prints it
    (pasted,) = shlex.split(arg)  # what the shell hands to train.py
    (override,) = OverridesParser.create().parse_overrides([pasted])
    assert (override.key_or_group, override.value()) == ("hydra.run.dir", folder)


def test_a_sweep_override_too_long_for_a_folder_name_gets_a_short_unique_folder(tmp_path):
    """Hydra names each job's folder after its overrides; past the 255-byte file-name limit its mkdir stopped
    the sweep with a traceback. Now the name is shortened with a hash (stable across relaunches), said in one
    line, and the job runs (here to its own start-up check of the missing weights file)."""
    from detlib.runs.lock import job_subdir

    long = "w" * 300
    proc = run_train("-m", "experiment=smoke", "trainer.device=cpu", "data.hflip_prob=0.5",
                     f"model.backbone.weights=/nonexistent/{long}", f"hydra.sweep.dir={tmp_path}", cwd=tmp_path)
    assert "File name too long" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "hydra.sweep.subdir: the job folder name is" in proc.stderr
    assert "model.backbone.weights: file not found" in proc.stderr  # the job itself started
    (job,) = [p for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith("0_")]
    assert len(job.name.encode()) <= 255
    name = "0_" + "x=" + "é" * 200
    assert job_subdir(name) == job_subdir(name) != job_subdir(name + "y")
    assert len(job_subdir(name).encode()) <= 255 and job_subdir("0_loss=l1") == "0_loss=l1"
