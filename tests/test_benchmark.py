"""tools/benchmark.py (detlib.tools.benchmark) runs end to end with tiny settings and writes the report it promises."""

from __future__ import annotations

import json

import pytest

from detlib.evaluation import backends
from detlib.tools import benchmark
from detlib.tools.bench_eval import installed_backends


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as e:
        benchmark.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--model", "--device", "--amp", "--channels-last", "--batch", "--iters", "--warmup",
                "--image-size", "--out"):
        assert opt in out


def test_tiny_cpu_run_writes_the_report(tmp_path, data_root, capsys):
    out = tmp_path / "bench.json"
    report = benchmark.run([
        "--device", "cpu", "--iters", "2", "--warmup", "1", "--windows", "2", "--batch", "2", "--image-size", "64",
        "--data-root", str(data_root), "--num-train", "64", "--num-val", "16", "--eval-images", "4",
        "--eval-repeats", "1", "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(report))
    for side in ("ours", "torchvision"):
        r = saved[side]
        assert r["images_per_s"] > 0 and r["step_s"] > 0 and r["peak_memory_mib"] > 0 and r["memory_method"]
        assert set(r["phases_s"]) == {"data", "forward", "backward", "optimizer"}
        assert all(v >= 0 for v in r["phases_s"].values())
        assert sum(r["phases_s"].values()) == pytest.approx(r["step_s"], rel=0.5)
    assert saved["ratio"]["step_time"] > 0 and saved["ratio"]["images_per_s"] > 0
    assert saved["settings"]["image_size"] == 64 and saved["settings"]["model"] == "small"
    ev = saved["eval"]
    assert ev["num_images"] == 4 and list(ev["backends"]) == installed_backends()  # pycocotools first
    assert ev["default"] == backends.resolve("auto")
    for b, r in ev["backends"].items():
        assert r["s"] > 0 and r["identical"] and r["version"], b
    table = capsys.readouterr().out
    assert "| images/s" in table and f"| {ev['default']} (auto) |" in table


def test_a_timing_run_on_random_images_builds_no_dataset_and_reports_tf32(tmp_path):
    """The CUDA path's bias: no 3,300-image dataset for a timing run, batches built before the windows."""
    root = tmp_path / "never-built"
    report = benchmark.run([
        "--device", "cpu", "--data", "random", "--image-size", "64", "--iters", "2", "--warmup", "1",
        "--windows", "2", "--batch", "2", "--eval-images", "0", "--threads", "1", "--data-root", str(root),
        "--distinct-batches", "2", "--out", str(tmp_path / "b.json")])
    assert not root.exists()
    s = report["settings"]
    assert s["data"] == "random" and set(s["tf32"]) == {"matmul", "cudnn_conv"} and s["distinct_batches"] == 2
    assert "eval" not in report
    for side in ("ours", "torchvision"):  # pre-built: fetching a batch is no work
        assert report[side]["phases_s"]["data"] < 0.05 * report[side]["step_s"]
        assert report[side]["syncs_per_step"] is None  # counted on CUDA only
