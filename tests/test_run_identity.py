"""A run folder holds one run: its identity recorded once (run.json), one live writer (.lock), and a
launch that does not match is refused without touching what is there. Real train.py processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detlib import distributed as dist
from detlib import runs as run_record
from detlib.device import fast_bf16

from .conftest import ROOT, run_train


def _smoke(data_root, run_dir, *extra):
    return ("experiment=smoke", f"data.root={data_root}", "trainer.progress=false", "trainer.device=cpu",
            f"hydra.run.dir={run_dir}", *extra)


def _snapshot(run_dir: Path) -> dict[str, bytes]:
    names = ("run.json", "metrics.json", ".hydra/config.yaml", ".hydra/overrides.yaml", "checkpoints/last.pt")
    return {n: (run_dir / n).read_bytes() for n in names}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("identity") / "run"
    proc = run_train(*_smoke(data_root, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_record_is_written_once_with_identity_config_and_data_fingerprints(finished):
    record = json.loads((finished / "run.json").read_text())
    ident = record["identity"]
    assert ident["loss._target_"] == "detlib.losses.SmoothL1" and ident["seed"] == 0 and ident["world_size"] == 1
    assert len(ident["data.fingerprint.train"]) == 64 and ident["data.fingerprint.train"] != ident["data.fingerprint.val"]
    assert not any(k.startswith(("trainer.device", "trainer.progress", "data.root", "model.roi_head.score_thresh"))
                   for k in ident)
    assert record["eval"]["model.roi_head.score_thresh"] == 0.05
    assert record["config"]["loss"]["_target_"] == "detlib.losses.SmoothL1"
    state = torch.load(finished / "checkpoints" / "last.pt", weights_only=False)
    assert state["meta"]["identity"] == ident  # every checkpoint carries it too


@pytest.mark.slow
@pytest.mark.parametrize("override,expected", [
    ("loss@rpn_loss=l1", "rpn_loss._target_: detlib.losses.SmoothL1 -> detlib.losses.L1"),
    ("data.noise.outliers=0.4", "data.noise.outliers: 0.0 -> 0.4"),
    ("trainer.momentum=0.5", "trainer.momentum: 0.9 -> 0.5"),
    # auto is recorded as the precision it chose: bf16 on this CPU, so not the finished float32 run
    pytest.param("trainer.amp=auto", "trainer.amp: off -> bf16", marks=pytest.mark.skipif(
        not fast_bf16(torch.device("cpu")), reason="this CPU has no fast bf16: auto is off, the same run")),
])
def test_relaunching_a_finished_run_with_another_setup_is_refused_and_its_files_kept(
        finished, data_root, override, expected):
    before = _snapshot(finished)
    proc = run_train(*_smoke(data_root, finished, override))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-2000:]
    assert expected in out
    assert "trainer.lr" not in out and "model.backbone" not in out  # only the keys that differ, no config dump
    assert _snapshot(finished) == before  # Hydra's rewrite of .hydra/ is put back from the record
    assert "run failed" not in (finished / "train.log").read_text()  # a refused launch is not the run's failure


@pytest.mark.slow
def test_inference_only_changes_are_allowed_and_named(finished, data_root):
    before = _snapshot(finished)
    proc = run_train(*_smoke(data_root, finished, "model.roi_head.score_thresh=0.5", "eval.batch_size=2"))
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    assert "skipping it" in out and "model.roi_head.score_thresh: 0.05 -> 0.5" in out
    assert _snapshot(finished)["metrics.json"] == before["metrics.json"]
    assert _snapshot(finished)["run.json"] == before["run.json"]


@pytest.mark.slow
def test_an_unfinished_run_resumed_with_another_loss_is_refused(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_train(*_smoke(data_root, run_dir, "trainer.checkpoint_period=3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir / "metrics.json").unlink()  # cut off before its final evaluation
    ckpts = run_dir / "checkpoints"
    (ckpts / "model_0000006.pt").unlink()
    (ckpts / "last.pt").unlink()
    (ckpts / "last.pt").hardlink_to(ckpts / "model_0000003.pt")
    proc = run_train(*_smoke(data_root, run_dir, "loss=l1"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "loss._target_: detlib.losses.SmoothL1 -> detlib.losses.L1" in out
    assert not (ckpts / "model_0000006.pt").exists() and not (run_dir / "metrics.json").exists()


def test_a_second_writer_is_refused_naming_the_lock_owner(tmp_path, data_root):
    run_dir = tmp_path / "run"
    with run_record.RunLock(run_dir):
        proc = run_train(*_smoke(data_root, run_dir))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"in use by another run (pid {os.getpid()} on host {socket.gethostname()}" in out
    assert not (run_dir / "run.json").exists() and not (run_dir / "checkpoints").exists()


def test_lock_is_released_when_its_owner_dies(tmp_path):
    code = f"from detlib.runs import RunLock; RunLock({str(tmp_path)!r}).acquire(); import os; os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
    with run_record.RunLock(tmp_path):  # no stale lock after the owner exited without releasing
        pass


def test_starting_fresh_in_a_folder_with_another_run_is_refused(finished, data_root):
    before = _snapshot(finished)
    proc = run_train(*_smoke(data_root, finished, "trainer.resume="))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "already holds a run" in out and "checkpoints/last.pt" in out
    after = _snapshot(finished)
    assert {k: v for k, v in after.items() if not k.startswith(".hydra")} == {
        k: v for k, v in before.items() if not k.startswith(".hydra")}
    assert b"trainer.resume=" not in after[".hydra/overrides.yaml"]  # the refused launch's, put back


def test_results_without_a_record_are_not_adopted(tmp_path, data_root):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"someone else's")
    proc = run_train(*_smoke(data_root, tmp_path))
    assert proc.returncode != 0
    assert "no run.json" in proc.stdout + proc.stderr


def test_two_launches_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    claimed = [dist.claim_new_folder("outputs") for _ in range(3)]
    assert len(set(claimed)) == 3 and all(Path(c).is_dir() for c in claimed)


def test_torchrun_ranks_and_restarts_share_one_folder_and_another_job_gets_its_own(tmp_path, monkeypatch):
    """rank 0 claims the folder and leaves it in torchrun's store; other ranks and restarted workers read it."""
    monkeypatch.chdir(tmp_path)
    store = torch.distributed.HashStore()
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    names = []
    for rank in (0, 1, 0):  # rank 0, rank 1, then rank 0 again after a restart
        monkeypatch.setattr(dist, "_STAMP", [])
        monkeypatch.setattr(dist, "_STORE", [store])
        monkeypatch.setattr(dist, "rank", lambda r=rank: r)
        names.append(dist.run_stamp("outputs"))
    assert len(set(names)) == 1
    monkeypatch.setattr(dist, "_STAMP", [])
    monkeypatch.setattr(dist, "_STORE", [torch.distributed.HashStore()])  # another torchrun job
    monkeypatch.setattr(dist, "rank", lambda: 0)
    assert dist.run_stamp("outputs") != names[0]


def test_a_crash_reason_reaches_train_log(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = run_train(*_smoke(data_root, run_dir, f"trainer.resume={tmp_path / 'missing.pt'}"))
    assert proc.returncode != 0
    log_text = (run_dir / "train.log").read_text()
    assert "run failed: CheckpointError" in log_text and "missing.pt" in log_text


def _popen(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_line(run_dir: Path, needle: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    log_file = run_dir / "train.log"
    while not (log_file.is_file() and needle in log_file.read_text()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline, f"{needle!r} never appeared"
        time.sleep(0.05)


@pytest.mark.slow
def test_sigint_saves_and_exits_130_with_the_command_that_continues(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = _popen(*_smoke(data_root, run_dir, "trainer.max_iters=100000", "trainer.log_period=1"))
    _wait_for_line(run_dir, "iter 2/", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    assert "SIGINT: saved a checkpoint at iteration" in out and f"hydra.run.dir={run_dir}" in out
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["iteration"] >= 2


@pytest.mark.slow
def test_a_second_sigint_during_a_long_evaluation_aborts_at_once(tmp_path, data_root):
    run_dir = tmp_path / "run"
    proc = _popen(*_smoke(data_root, run_dir, "trainer.max_iters=2", "data.synthetic.num_val=64",
                          "eval.batch_size=1"))
    _wait_for_line(run_dir, "evaluating 64 val images", proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None, "the first SIGINT must wait for a safe point"
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5, "the second SIGINT did not abort at once"
    assert proc.returncode == 130, out[-3000:]
    assert "aborted at once" in out
    assert not (run_dir / "metrics.json").exists()
    assert torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["iteration"] == 2


def test_identity_drops_execution_keys_and_keeps_everything_else():
    config = {"seed": 1, "trainer": {"device": "cuda", "lr": 0.02, "progress": True, "log_period": 5},
              "data": {"root": "/a", "noise": {"outliers": 0.1}}, "model": {"roi_head": {"score_thresh": 0.05}, "width": 32},
              "loss": {"_target_": "detlib.losses.Huber", "delta": 1.0}}
    ident = run_record.identity(config, world_size=2, num_classes=4, data_fingerprints={"train": "f"})
    assert ident == {"seed": 1, "trainer.lr": 0.02, "data.noise.outliers": 0.1, "model.width": 32,
                     "loss._target_": "detlib.losses.Huber", "loss.delta": 1.0, "world_size": 2, "num_classes": 4,
                     "data.fingerprint.train": "f"}
    assert run_record.eval_settings(config) == {"model.roi_head.score_thresh": 0.05}
    assert run_record.diff(ident, ident | {"loss.delta": 0.5, "new": 1}) == ["loss.delta: 1.0 -> 0.5", "new: <unset> -> 1"]
    hp = run_record.hparams({"identity": ident, "choices": {"loss": "huber", "model": "small"}})
    assert hp["loss"] == "huber" and hp["loss.delta"] == 1.0 and hp["seed"] == 1 and hp["model"] == "small"
    swept = run_record.hparams({"identity": ident, "choices": {"loss": "huber", "model": "small"},
                                "overrides": ["loss=huber", "+data.noise.outliers=0.1", "trainer.lr=0.02", "seed=1"]})
    assert list(swept)[:5] == ["loss", "data.noise.outliers", "lr", "seed", "model"]  # what a sweep varies, first
    # Every run writes every key, so a key another run overrode has a value in its row too (TensorBoard marks
    # the columns whose values differ); but the internal _target_ keys and the aliased ones.
    assert hp["model.width"] == 32 and hp["data.noise.outliers"] == 0.1 and hp["world_size"] == 2
    assert not {"loss._target_", "trainer.lr", "data.fingerprint.train"} & set(hp)


def test_the_evaluator_is_in_no_identity_so_runs_from_before_auto_continue_and_group_with_new_ones(tmp_path):
    """``eval.backend``'s default went from pycocotools to auto (same numbers): a run recorded before is the same
    run when relaunched (continued or skipped), and one group with runs scored by another backend, although
    ``eval_detail.json`` now records the backend that scored it. Inference settings still split groups."""
    def config(backend: str, max_dets: list[int]) -> dict:
        return {"seed": 3, "trainer": {"lr": 0.02}, "eval": {"backend": backend, "max_dets": max_dets, "batch_size": 16},
                "model": {"width": 32}}

    def ident(cfg: dict) -> dict:
        return run_record.identity(cfg, world_size=1, num_classes=4, data_fingerprints={"train": "f"})

    before, now = config("pycocotools", [1, 10, 100]), config("auto", [1, 10, 100])
    assert ident(before) == ident(now) and "eval.backend" not in ident(now)
    record = {"identity": ident(before), "eval": run_record.eval_settings(before)}
    run_record.check(record, ident(now), tmp_path)  # the relaunch is accepted: the same run
    assert run_record.ignored("eval.backend")  # an override of it names no group either
    old_detail = run_record.eval_settings(before)  # eval_detail.json's eval_settings before: no backend
    group = run_record.comparison_identity(record, old_detail)
    for used in ("ultrafast_pycocotools", "hotcoco", "pycocotools"):
        new_record = {"identity": ident(now) | {"seed": 4}, "eval": run_record.eval_settings(now)}
        assert run_record.comparison_identity(new_record, old_detail | {"eval.backend": used}) == group
    other = config("auto", [1, 10, 300])
    assert run_record.comparison_identity({"identity": ident(other), "eval": run_record.eval_settings(other)}) != group


def test_a_record_is_never_overwritten(tmp_path):
    run_record.write_record(tmp_path, {"identity": {"seed": 0}})
    with pytest.raises(FileExistsError):
        run_record.write_record(tmp_path, {"identity": {"seed": 1}})
    assert run_record.read_record(tmp_path)["identity"] == {"seed": 0}
    (tmp_path / "run.json").write_text("{not json")
    with pytest.raises(run_record.RunIdentityError, match="run.json: unreadable"):
        run_record.read_record(tmp_path)


@pytest.mark.slow
def test_rerunning_the_same_command_continues_the_interrupted_run_in_its_folder(tmp_path, data_root):
    """No hydra.run.dir: SIGINT, then the very same command resumes at the saved iteration in the same folder;
    trainer.resume=new starts over in a new one."""
    args = ["experiment=smoke", f"data.root={data_root}", "trainer.progress=false", "trainer.device=cpu",
            "trainer.max_iters=12", "trainer.log_period=1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(ROOT / "train.py"), *args]
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("outputs/*/*/train.log")):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    (run_dir,) = [p.parent for p in tmp_path.glob("outputs/*/*/train.log")]
    _wait_for_line(run_dir, "iter 2/", proc)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out[-3000:]
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["iteration"]
    assert 2 <= saved < 12 and not (run_dir / "metrics.json").exists()
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert [p.parent for p in tmp_path.glob("outputs/*/*/train.log")] == [run_dir]  # the same folder
    assert f"resumed from {run_dir.resolve() / 'checkpoints' / 'last.pt'} at iteration {saved}" in \
        (run_dir / "train.log").read_text()
    assert (run_dir / "metrics.json").is_file()
    fresh = subprocess.run([*command, "trainer.resume=new"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert len(list(tmp_path.glob("outputs/*/*/metrics.json"))) == 2  # started over in a new folder
