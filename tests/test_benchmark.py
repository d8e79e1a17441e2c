"""tools/benchmark.py (detlib.tools.benchmark) runs end to end with tiny settings and writes the report it promises."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from detlib.data.coco import coco_from_dict
from detlib.evaluation import backends
from detlib.evaluation.coco_eval import STAT_NAMES, evaluate_coco
from detlib.tools import bench_eval, benchmark, evaluate
from detlib.tools.bench_eval import eval_fixture, installed_backends


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


def test_eval_fixture_is_deterministic_with_crowds_empty_images_and_over_100_detections():
    gt, dt = eval_fixture(n_images=60, n_objects=300, n_detections=3000, seed=3)
    again, dt_again = eval_fixture(n_images=60, n_objects=300, n_detections=3000, seed=3)
    assert gt == again and dt == dt_again and eval_fixture(60, 300, 3000, seed=4)[1] != dt
    assert len(gt["images"]) == 60 and len(gt["annotations"]) == 300 and len(dt) == 3000
    assert any(a["iscrowd"] for a in gt["annotations"]) and len(gt["categories"]) == 80
    per_image = {i: 0 for i in range(1, 61)}
    for d in dt:
        per_image[d["image_id"]] += 1
    assert max(per_image.values()) > 100
    assert {a["image_id"] for a in gt["annotations"]} < set(per_image)  # images without objects
    stats, _ = evaluate_coco(coco_from_dict(gt), dt, backend="pycocotools")
    assert 0.05 < stats["AP"] < 0.9


def test_eval_processes_times_whole_evaluate_runs_and_checks_their_stats(tmp_path, capsys, monkeypatch):
    """``--eval-processes``: each backend's run a process of its own, in alternation, stats compared with
    pycocotools'. The processes here only copy known metrics (a real one starts numpy and pycocotools: a second
    each); the command they stand for is ``evaluate.py``'s own parser's."""
    cmd = bench_eval.evaluate_command(Path("g.json"), Path("d.json"), "hotcoco", Path("m.json"))
    args = evaluate.parse_args(cmd[3:])
    assert cmd[:2] == [sys.executable, "-c"] and (args.gt, args.dt, args.backend, args.out) == (
        Path("g.json"), Path("d.json"), "hotcoco", Path("m.json"))
    stats = dict.fromkeys(STAT_NAMES, 0.5) | {"APl": None}
    off = stats | {"AP": 0.5 + 1e-9}
    script = "import json, sys; json.dump(json.loads(sys.argv[2]), open(sys.argv[1], 'w'))"
    monkeypatch.setattr(bench_eval, "evaluate_command", lambda gt, dt, b, out: [
        sys.executable, "-c", script, str(out), json.dumps(off if b == "faster_coco_eval" else stats)])
    fixture = tmp_path / "fixture"
    report = benchmark.run(["--eval-processes", "--fixture-images", "20", "--fixture-objects", "60",
                            "--fixture-detections", "400", "--eval-repeats", "2", "--backends", "hotcoco",
                            "faster_coco_eval", "--fixture-dir", str(fixture), "--out", str(tmp_path / "e.json")])
    e = report["eval_processes"]
    assert list(e["backends"]) == ["pycocotools", "hotcoco", "faster_coco_eval"] and e["stats"] == stats
    for b, r in e["backends"].items():
        assert len(r["runs_s"]) == 2 and r["s"] > 0 and r["ratio"] > 0 and r["identical"] == (b != "faster_coco_eval")
    assert e["backends"]["faster_coco_eval"]["max_abs_diff"] == pytest.approx(1e-9)
    assert (fixture / "gt.json").is_file() and (fixture / "dt.json").is_file()
    assert json.loads((tmp_path / "e.json").read_text())["settings"]["fixture"]["n_images"] == 20
    out = capsys.readouterr().out
    assert "Whole `evaluate.py --gt --dt` processes on 20 images" in out and "| NO (max diff 1.0e-09) |" in out
