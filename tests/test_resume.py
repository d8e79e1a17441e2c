"""Kill and resume from outside, as a cluster would."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from .conftest import ROOT, run_train

ITERS = 30


def _args(data_root, run_dir, *extra):
    return ["experiment=smoke", f"data.root={data_root}", f"trainer.max_iters={ITERS}", "trainer.log_period=1",
            "trainer.checkpoint_period=10", "trainer.progress=false", f"hydra.run.dir={run_dir}", *extra]


def _popen(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def _curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    ea = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    return [(e.step, e.value) for e in ea.Scalars(tag)]


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical_to_a_straight_run(tmp_path, data_root):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = run_train(*_args(data_root, straight))
    assert proc.returncode == 0, proc.stderr[-3000:]

    victim = _popen(_args(data_root, killed))
    _wait_for(killed / "checkpoints" / "model_0000010.pt", victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert not (killed / "metrics.json").exists(), "the run finished before it could be killed"
    resumed = run_train(*_args(data_root, killed, "trainer.resume=auto"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr + resumed.stdout

    for tag in ("loss/total", "loss/box_reg", "lr", "train/shadow/l2", "val/AP"):
        a, b = _curve(straight, tag), _curve(killed, tag)
        assert [s for s, _ in b] == sorted({s for s, _ in b}), f"{tag}: duplicated steps"
        assert a == b, tag  # bit-identical values at identical steps
    wa = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    wb = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)
    assert wa["iteration"] == wb["iteration"] == ITERS
    for k, v in wa["model"].items():
        assert torch.equal(v, wb["model"][k]), k
    assert (straight / "metrics.json").read_text() == (killed / "metrics.json").read_text()


@pytest.mark.slow
def test_sigterm_saves_at_the_next_step_and_exits_cleanly(tmp_path, data_root):
    """In a sweep: the running job saves, and the sweep stops instead of starting its next job."""
    sweep = tmp_path / "sweep"
    args = [a for a in _args(data_root, tmp_path, "trainer.max_iters=100000", "trainer.checkpoint_period=1000")
            if not a.startswith("hydra.run.dir")]
    proc = _popen(["-m", *args, "loss=l1,huber", f"hydra.sweep.dir={sweep}"])
    deadline = time.monotonic() + 120
    while not list(sweep.glob("0_*/tb")):
        assert proc.poll() is None and time.monotonic() < deadline, "the first job never started"
        time.sleep(0.05)
    run_dir = next(sweep.glob("0_*"))
    time.sleep(1.0)  # a few iterations in
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM: schedulers see an interrupted job
    assert "SIGTERM: saved a checkpoint at iteration" in out
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert 0 < state["iteration"] < 100000
    assert not list(sweep.glob("1_*")), "the sweep went on to its next job after SIGTERM"


def test_deleted_last_checkpoint_resumes_from_the_newest_numbered_one_and_loses_no_file(tmp_path, data_root,
                                                                                       monkeypatch):
    """A run dies at iteration 7 (checkpoints at 2, 4, 6); last.pt is deleted; the same command continues
    from model_0000006.pt, naming it, and every numbered checkpoint of the first attempt is still there."""
    run_dir = tmp_path / "run"
    args = ["experiment=smoke", f"data.root={data_root}", "trainer.device=cpu", "trainer.max_iters=8",
            "trainer.checkpoint_period=2", "trainer.keep_last=10", "trainer.progress=false",
            "loss=l1", "loss._target_=tests.faults.CrashOnce", f"hydra.run.dir={run_dir}"]
    monkeypatch.setenv("DETLIB_FAULT_RANK", "0")
    monkeypatch.setenv("DETLIB_FAULT_CALL", "7")
    assert run_train(*args).returncode == 17  # died in iteration 7
    ckpts = run_dir / "checkpoints"
    first = {p.name: p.read_bytes() for p in ckpts.glob("model_*.pt")}
    assert sorted(first) == ["model_0000002.pt", "model_0000004.pt", "model_0000006.pt"]
    (ckpts / "last.pt").unlink()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")  # CrashOnce: no crash this time
    proc = run_train(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "resuming from the newest intact numbered checkpoint" in log and "model_0000006.pt" in log
    assert "at iteration 6" in log
    for name, data in first.items():
        assert (ckpts / name).read_bytes() == data, f"{name} lost or overwritten"
    assert torch.load(ckpts / "last.pt", weights_only=True)["iteration"] == 8
