"""DDP on CPU with gloo and 2 processes, launched by the real torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlib.data.build import build_datasets
from detlib.engine.build import build_model
from detlib.evaluation.inference import evaluate, shard_batches

from .conftest import ROOT, compose_cfg

pytestmark = pytest.mark.slow


def torchrun(*args: str, cwd: Path = ROOT, env: dict | None = None, restarts: int = 0,
             timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           f"--max-restarts={restarts}", str(ROOT / "train.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _smoke(data_root: Path, *extra: str) -> list[str]:
    return ["experiment=smoke", f"data.root={data_root}", "trainer.device=cpu", "trainer.progress=false", *extra]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-process training run with Hydra's default output directory, from a fresh working dir."""
    cwd = tmp_path_factory.mktemp("ddp")
    proc = torchrun(*_smoke(data_root), cwd=cwd)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return cwd, proc


def test_torchrun_one_output_directory_one_event_file_one_writer(ddp_run):
    cwd, proc = ddp_run
    runs = [p.parent for p in (cwd / "outputs").rglob("train.log")]
    assert len(runs) == 1, runs  # both ranks used the same Hydra run directory
    run = runs[0]
    assert [p.name for p in run.parent.iterdir()] == [run.name]  # rank 0 claimed one folder; rank 1 none
    assert len(list((run / "tb").glob("events.out.tfevents.*"))) == 1  # one event file, rank 0's
    log_text = (run / "train.log").read_text()
    assert log_text.count("run directory:") == 1 and "(2 processes)" in log_text  # rank 1 wrote nothing
    assert json.loads((run / "metrics.json").read_text()).keys() >= {"AP", "AP50"}
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert state["iteration"] == 6 and len(state["rng_per_rank"]) == 2
    assert state["meta"]["identity"]["world_size"] == 2
    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert [e.step for e in ea.Scalars("loss/box_reg")] == [2, 4, 6]  # logged once, not per rank


def _eval_worker(rank: int, world: int, init_file: str, data_root: str, ckpt: str, out: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        stats, _losses, results, _E = _evaluate_checkpoint(data_root, ckpt)
        if rank == 0:
            torch.save({"stats": stats, "results": results}, out)
    finally:
        tdist.destroy_process_group()


def _evaluate_checkpoint(data_root: str, ckpt: str):
    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "eval.batch_size=3")
    typed = OmegaConf.to_object(cfg)
    _, val_set = build_datasets(typed.data)
    model = build_model(cfg, val_set.num_classes)
    model.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
    return evaluate(model, val_set, torch.device("cpu"), batch_size=3)


def test_distributed_evaluation_equals_single_process(ddp_run, data_root, tmp_path):
    cwd, _ = ddp_run
    ckpt = next((cwd / "outputs").rglob("last.pt"))
    # 16 val images in batches of 3: 6 batches, the last with one image; the ranks get 3 batches each
    assert [len(b) for b in shard_batches(16, 3, 1, 2)] == [3, 3, 1]
    out = tmp_path / "ddp.pt"
    mp.spawn(_eval_worker, args=(2, str(tmp_path / "init"), str(data_root), str(ckpt), str(out)), nprocs=2)
    ddp = torch.load(out, weights_only=False)
    stats, _, results, _ = _evaluate_checkpoint(str(data_root), str(ckpt))
    assert len(results) > 0
    assert ddp["stats"] == pytest.approx(stats, abs=1e-9)  # all 12 stats
    # the same detections; coordinates may differ in the last bits (other processes, other thread counts)
    key = lambda r: (r["image_id"], r["category_id"], round(r["score"], 4), [round(v, 1) for v in r["bbox"]])  # noqa: E731
    ddp_results, results = sorted(ddp["results"], key=key), sorted(results, key=key)
    assert [(r["image_id"], r["category_id"]) for r in ddp_results] == [(r["image_id"], r["category_id"]) for r in results]
    assert [r["score"] for r in ddp_results] == pytest.approx([r["score"] for r in results], abs=1e-5)
    assert [r["bbox"] for r in ddp_results] == [pytest.approx(r["bbox"], abs=1e-3) for r in results]


def test_nan_on_one_rank_stops_every_rank_at_the_same_iteration(tmp_path, data_root):
    run = tmp_path / "run"
    proc = torchrun(*_smoke(data_root, "loss=l1", "loss._target_=tests.faults.NaNOnRank", "trainer.checkpoint_period=1",
                            f"hydra.run.dir={run}"),
                    env={"DETLIB_FAULT_RANK": "1", "DETLIB_FAULT_CALL": "3"}, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "non-finite loss at iteration 3" in out and "non-finite loss on another rank at iteration 3" in out
    assert (run / "nonfinite_iter0000003_rank1.pt").is_file()  # the offending rank's batch
    assert not (run / "nonfinite_iter0000003_rank0.pt").exists()
    saved = sorted(p.name for p in (run / "checkpoints").glob("model_*.pt"))
    assert saved == ["model_0000001.pt", "model_0000002.pt"]  # nothing after the non-finite step


def test_elastic_restart_resumes_and_reaches_the_same_metrics(tmp_path, data_root):
    straight, restarted = tmp_path / "straight", tmp_path / "restarted"
    args = ("loss=l1", "trainer.checkpoint_period=2")
    ok = torchrun(*_smoke(data_root, *args, f"hydra.run.dir={straight}"))
    assert ok.returncode == 0, (ok.stdout + ok.stderr)[-4000:]
    proc = torchrun(*_smoke(data_root, *args, "loss._target_=tests.faults.CrashOnce", f"hydra.run.dir={restarted}"),
                    env={"DETLIB_FAULT_RANK": "1", "DETLIB_FAULT_CALL": "5"}, restarts=1)
    out = proc.stdout + proc.stderr
    log_text = (restarted / "train.log").read_text() if (restarted / "train.log").exists() else ""
    assert proc.returncode == 0, out[-3000:] + "\n--- train.log ---\n" + log_text[-3000:]
    assert "resumed from" in out and "at iteration 4" in out
    assert json.loads((restarted / "metrics.json").read_text()) == json.loads((straight / "metrics.json").read_text())


def test_batch_without_foreground_under_ddp(tmp_path, data_root):
    """Empty-foreground batches everywhere (no ground truth at all): DDP raises no unused-parameter error."""
    run = tmp_path / "run"
    # images without objects (thresholds above 1, the old way to empty the foreground, are refused at start-up)
    proc = torchrun(*_smoke(data_root, "data.synthetic.min_objects=0", "data.synthetic.max_objects=0",
                            "trainer.max_iters=2", f"hydra.run.dir={run}"),
                    timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (run / "metrics.json").is_file()
