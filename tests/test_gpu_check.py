"""tools/gpu_check.sh: the GPU minutes' one command. Its CPU rehearsal (--dry-run) runs every step at toy
sizes, so the script is known to work before a GPU is lent; without CUDA the real run stops at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT

SCRIPT = ROOT / "tools" / "gpu_check.sh"


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "2"}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_real_check_stops_at_once_saying_why(tmp_path):
    proc = _run(str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2
    assert "no CUDA device here" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out" / "summary.txt").exists()


@pytest.mark.slow
def test_dry_run_goes_through_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    proc = _run(str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = (out / "summary.txt").read_text()
    for step in ("env", "preflight", "default", "resume_straight", "resume_continued", "bench_vs_fp32", "predict"):
        assert f"{step} rc=0" in summary, summary
    assert "resume_killed rc=" in summary
    preflight = json.loads((out / "preflight.json").read_text())
    assert [r["amp"] for r in preflight["runs"]] == ["bf16", "fp16", "off"]
    assert all("error" not in r for r in preflight["runs"])
    for name in ("default_bf16", "fp16_straight", "fp16_killed"):
        assert json.loads((out / name / "metrics.json").read_text())["AP"] is not None
    assert "resumed from" in (out / "resume_continued.log").read_text()
    md = (out / "summary.md").read_text()
    assert "## Preflight" in md and "## bench_vs_fp32" in md and "resumed minus straight" in md
    assert (out / "predict" / "detections.json").is_file()
