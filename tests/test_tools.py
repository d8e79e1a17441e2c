"""The user tools (detlib.tools, run as tools/*.py): evaluate, compare_runs, plot_losses, visualize. Real
pycocotools, Hydra, TensorBoard.

One smoke run (module fixture) serves the checkpoint-mode tests; everything else uses small files
written here with known numbers.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlib import runs as run_record
from detlib.config import Config
from detlib.engine.restore import load_run_config
from detlib.evaluation import stats as ttest
from detlib.evaluation.coco_eval import STAT_NAMES
from detlib.runs.groups import group_runs
from detlib.runs.results import find_runs, load_run
from detlib.tools import (
    browse_dataset,
    compare_runs,
    evaluate,
    export,
    plot_logs,
    plot_losses,
    predict,
    visualize,
)
from detlib.tools.cli import ToolError
from detlib.tools.compare_plots import plot_against
from detlib.tools.results import RESULT_FIELDS
from detlib.tools.sweep_callbacks import CompareRuns

from .conftest import ROOT, run_train

TOOLS = ROOT / "tools"
ALL = {"evaluate": evaluate, "compare_runs": compare_runs, "plot_losses": plot_losses, "visualize": visualize,
       "predict": predict, "export": export, "plot_logs": plot_logs, "browse_dataset": browse_dataset}


# ---------------------------------------------------------------------------------------------
# Fixtures: a tiny COCO dataset with images, detections with distinct scores, and a smoke run.

CATS = [{"id": 1, "name": "a"}, {"id": 5, "name": "b"}, {"id": 9, "name": "c"}]  # non-contiguous on purpose
GT_BOXES = {10: [([5, 5, 20, 20], 1), ([30, 30, 25, 20], 5)],
            11: [([10, 10, 40, 30], 9), ([2, 40, 12, 12], 1), ([44, 2, 16, 16], 5)],
            12: [([20, 5, 30, 30], 5), ([0, 0, 10, 10], 1)]}
DETS = [  # near hits, a loose hit, a wrong class, a false positive, a duplicate
    (10, 1, [6, 5, 20, 19], 0.95), (10, 5, [31, 29, 24, 22], 0.81), (10, 9, [0, 30, 20, 20], 0.33),
    (11, 9, [12, 12, 36, 28], 0.90), (11, 1, [2, 38, 14, 13], 0.42), (11, 5, [40, 0, 20, 22], 0.61),
    (11, 1, [3, 41, 11, 11], 0.20), (12, 5, [22, 7, 30, 26], 0.77), (12, 1, [1, 1, 12, 12], 0.55),
    (12, 9, [20, 5, 30, 30], 0.12), (12, 5, [25, 10, 20, 20], 0.29),
]


@pytest.fixture(scope="module")
def coco_files(tmp_path_factory) -> dict[str, Path]:
    """``gt``: annotations of 3 images (64x64 PNGs in ``images``), ``dt``: 11 detections."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    images, anns = [], []
    for image_id, boxes in GT_BOXES.items():
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(root / "images" / f"{image_id}.png")
        images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 64, "height": 64})
        for box, cat in boxes:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat, "bbox": box,
                         "area": box[2] * box[3], "iscrowd": 0})
    gt = root / "gt.json"
    gt.write_text(json.dumps({"info": {}, "images": images, "annotations": anns, "categories": CATS}))
    dt = root / "dt.json"
    dt.write_text(json.dumps([{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in DETS]))
    return {"gt": gt, "dt": dt, "images": root / "images"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, data_root) -> Path:
    run_dir = tmp_path_factory.mktemp("tools-smoke")
    proc = run_train("experiment=smoke", "trainer.device=cpu", f"data.root={data_root}", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def pycocotools_stats(gt: Path, dt: Path) -> list[float]:
    """The 12 stats straight from pycocotools, as its README runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt))
        E = COCOeval(coco_gt, coco_gt.loadRes(str(dt)), "bbox")
        E.evaluate()
        E.accumulate()
        E.summarize()
    return list(E.stats)


# ---------------------------------------------------------------------------------------------
# Every tool


@pytest.mark.parametrize("name", sorted(ALL))
def test_help_exits_zero(name, capsys):
    with pytest.raises(SystemExit) as e:
        ALL[name].main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}.py") and f"uv run tools/{name}.py" in out  # with the examples


def test_every_script_is_a_thin_entry_point_and_a_console_script():
    """tools/NAME.py only calls detlib.tools.NAME.main, which pyproject also installs as a detlib-* command."""
    scripts = {ep.value: ep.name for ep in entry_points(group="console_scripts") if ep.value.startswith("detlib.")}
    names = sorted(p.stem for p in TOOLS.glob("*.py") if p.stem != "rundir")  # rundir.py: a shim for old imports
    assert names == sorted([*ALL, "benchmark", "gpu_preflight"])
    for name in names:
        assert f"detlib.tools.{name}:main" in scripts, name
        assert f"from detlib.tools.{name} import main" in (TOOLS / f"{name}.py").read_text()
    command = Path(sys.executable).with_name(scripts["detlib.tools.compare_runs:main"])
    proc = subprocess.run([str(command), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: detlib-compare"), proc.stderr[-2000:]


def test_script_runs_from_the_command_line_and_fails_cleanly(coco_files, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image_id": 10,')
    proc = subprocess.run([sys.executable, str(TOOLS / "evaluate.py"), "--gt", str(coco_files["gt"]), "--dt", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.startswith(f"evaluate.py: error: {bad}: not valid JSON")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1  # one line, nothing else


# ---------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_file_mode_equals_pycocotools(coco_files, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert evaluate.main(["--gt", str(coco_files["gt"]), "--dt", str(coco_files["dt"]), "--out", str(out),
                          "--detail", str(tmp_path / "eval_detail.json")]) == 0
    ours = json.loads(out.read_text())
    assert list(ours) == list(STAT_NAMES)
    theirs = pycocotools_stats(coco_files["gt"], coco_files["dt"])
    for k, v in zip(STAT_NAMES, theirs):
        assert (ours[k] is None) == (v == -1), k
        if ours[k] is not None:
            assert ours[k] == pytest.approx(v, abs=1e-12), k
    assert 0.3 < ours["AP"] < 0.9 and ours["APl"] is None  # a fixture that exercises the maths, no large objects
    detail = json.loads((tmp_path / "eval_detail.json").read_text())
    assert detail["ap_per_iou"]["0.50"] == pytest.approx(theirs[1], abs=1e-12)
    assert detail["ap_per_iou"]["0.75"] == pytest.approx(theirs[2], abs=1e-12)
    assert sum(detail["ap_per_iou"].values()) / 10 == pytest.approx(theirs[0], abs=1e-12)
    assert set(detail["per_class_ap"]) == {"a", "b", "c"}
    text = capsys.readouterr().out
    assert "AP @[.50:.95]" in text and "AP per class" in text
    assert all(f"\n{name} " in text for name in ("a", "b", "c"))


@pytest.mark.parametrize("content,needle", [
    (None, "detections file not found"),
    ("[{", "not valid JSON"),
    ('{"image_id": 10}', "is a JSON list of detections"),
    ('[{"image_id": 10, "category_id": 1, "bbox": [1, 2, 3, 4]}]', "entry 0 has no field 'score'"),
    ('[{"image_id": 10, "category_id": 1, "bbox": [1, 2, 3], "score": 0.5}]', "field 'bbox' must be 4 numbers"),
    ('[{"image_id": 10, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5},'
     ' {"image_id": 999, "category_id": 1, "bbox": [1, 2, 3, 4], "score": 0.5}]', "entry 1: image_id 999"),
    ('[{"image_id": 10, "category_id": 7, "bbox": [1, 2, 3, 4], "score": 0.5}]', "entry 0: category_id 7"),
])
def test_evaluate_bad_detections_name_the_file_and_value(coco_files, tmp_path, capsys, content, needle):
    dt = tmp_path / "dt.json"
    if content is not None:
        dt.write_text(content)
    assert evaluate.main(["--gt", str(coco_files["gt"]), "--dt", str(dt)]) == 1
    err = capsys.readouterr().err
    assert needle in err and str(dt) in err and "Traceback" not in err


def test_evaluate_bad_ground_truth_and_run(tmp_path, capsys):
    assert evaluate.main(["--gt", str(tmp_path / "gt.json"), "--dt", str(tmp_path / "dt.json")]) == 1
    assert f"annotation file not found: {tmp_path / 'gt.json'}" in capsys.readouterr().err
    assert evaluate.main(["--run", str(tmp_path / "nope")]) == 1
    assert f"run directory not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert evaluate.main(["--run", str(tmp_path)]) == 1
    assert "not a run directory (no run.json)" in capsys.readouterr().err


@pytest.fixture(scope="module")
def smoke_eval(smoke_run, tmp_path_factory) -> tuple[Path, str]:
    """``tools/evaluate.py --run`` on the smoke run: its output folder and what it printed."""
    folder = tmp_path_factory.mktemp("smoke-eval")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert evaluate.main(["--run", str(smoke_run), "--device", "cpu", "--out", str(folder / "m.json"),
                              "--dets", str(folder / "dets.json")]) == 0
    return folder, printed.getvalue()


def smoke_val_ann(smoke_run: Path) -> Path:
    train_ann = torch.load(smoke_run / "checkpoints" / "last.pt", weights_only=False)["meta"]["data_files"]["train"]
    return Path(train_ann).with_name("instances_val.json")


def test_evaluate_checkpoint_reproduces_the_runs_metrics(smoke_run, smoke_eval, tmp_path):
    folder, printed = smoke_eval
    ours, theirs = json.loads((folder / "m.json").read_text()), json.loads((smoke_run / "metrics.json").read_text())
    assert list(ours) == list(theirs) == list(STAT_NAMES)
    assert theirs["AR100"] > 0  # the smoke model finds something, so equality below means something
    for k in STAT_NAMES:
        assert (ours[k] is None) == (theirs[k] is None), k
        if ours[k] is not None:
            assert abs(ours[k] - theirs[k]) <= 1e-6, k
    assert "(iteration 6)" in printed and "AP per class" in printed
    detail, run_detail = (json.loads(p.read_text()) for p in (folder / "eval_detail.json",
                                                              smoke_run / "eval_detail.json"))
    assert detail["iteration"] == 6 and detail["per_class_ap"].keys() == run_detail["per_class_ap"].keys()
    assert list(detail["ap_per_iou"]) == list(run_detail["ap_per_iou"])
    assert all(abs((a or 0) - (b or 0)) <= 1e-6 for a, b in zip(detail["ap_per_iou"].values(),
                                                                 run_detail["ap_per_iou"].values()))
    # The detections file is a COCO results file: file mode on it gives the same numbers again.
    again = tmp_path / "again.json"
    assert evaluate.main(["--gt", str(smoke_val_ann(smoke_run)), "--dt", str(folder / "dets.json"),
                          "--out", str(again)]) == 0
    assert json.loads(again.read_text()) == ours
    # pycocotools run directly on that file agrees too: the file is in the order that was scored (ties).
    direct = pycocotools_stats(smoke_val_ann(smoke_run), folder / "dets.json")
    assert all((ours[k] is None) == (v == -1) and (ours[k] is None or abs(ours[k] - v) <= 1e-9)
               for k, v in zip(STAT_NAMES, direct))


def test_evaluate_writes_the_trainers_eval_detail_layout(smoke_run, smoke_eval):
    detail, run_detail = (json.loads(p.read_text()) for p in (smoke_eval[0] / "eval_detail.json",
                                                              smoke_run / "eval_detail.json"))
    assert list(detail) == list(run_detail)  # one writer: detlib.evaluation.report
    assert detail["eval_settings"] == run_detail["eval_settings"] and detail["eval_settings"]


def test_evaluate_another_checkpoint_and_a_missing_one(smoke_run, smoke_eval, tmp_path, capsys):
    out = tmp_path / "m3.json"
    assert evaluate.main(["--run", str(smoke_run), "--checkpoint", str(smoke_run / "checkpoints" / "model_0000003.pt"),
                          "--device", "cpu", "--out", str(out)]) == 0
    assert "(iteration 3)" in capsys.readouterr().out
    assert json.loads(out.read_text()) != json.loads((smoke_eval[0] / "m.json").read_text())  # not last.pt's
    assert evaluate.main(["--run", str(smoke_run), "--checkpoint", str(tmp_path / "x.pt")]) == 1
    assert f"checkpoint not found: {tmp_path / 'x.pt'}" in capsys.readouterr().err


def test_run_config_overrides(smoke_run):
    cfg = load_run_config(smoke_run, ["data.synthetic.num_val=8"])
    assert cfg.data.synthetic.num_val == 8 and cfg.data.synthetic.num_train == 64  # the rest is the run's
    cfg = load_run_config(smoke_run, ["data=coco", "data.root=/data/coco", "data.val_ann=v.json"])
    assert (cfg.data.name, cfg.data.root, cfg.data.val_ann, cfg.data.batch_size) == ("coco", "/data/coco", "v.json", 2)
    assert cfg.trainer.max_iters == 6 and cfg.loss._target_ == "detlib.losses.SmoothL1"


# ---------------------------------------------------------------------------------------------
# compare_runs.py


def fake_run(path: Path, loss: str, seed: int, ap: float | None, overrides: list[str] | None = None,
             device: str = "cpu", curve: bool = True, choices: dict | None = None, **extra: object) -> Path:
    """A run directory in train.py's format (run.json of the config on detlib.config's schema, Hydra's .hydra
    files), with AP = ``ap`` and the other stats derived from it."""
    (path / ".hydra").mkdir(parents=True)
    losses = {"smooth_l1": {"_target_": "detlib.losses.SmoothL1", "weight": 1.0, "beta": 0.111},
              "huber": {"_target_": "detlib.losses.Huber", "weight": 1.0, "delta": 1.0},
              "l1": {"_target_": "detlib.losses.L1", "weight": 1.0}}
    cfg = {"seed": seed, "trainer": {"device": device, "max_iters": 10, "progress": False}, "loss": losses[loss]}
    cfg |= extra
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    overrides = overrides or [f"loss={loss}", f"seed={seed}", "trainer.progress=False"]
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    config = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(Config), cfg), resolve=True,
                                    enum_to_str=True)
    ident = run_record.identity(config, world_size=1, num_classes=4, data_fingerprints={"train": "a" * 64,
                                                                                        "val": "b" * 64})
    run_record.write_record(path, run_record.make_record(config, ident, overrides=overrides,
                                                         choices=choices or {"loss": loss}, data_files={}))
    if ap is None:
        return path
    metrics = {k: None for k in STAT_NAMES} | {"AP": ap, "AP50": ap + 0.2, "AP75": ap + 0.1, "APs": ap - 0.1,
                                                "APm": ap + 0.05, "AR100": ap + 0.15}
    (path / "metrics.json").write_text(json.dumps(metrics))
    if curve:
        ap_per_iou = {f"{0.5 + 0.05 * i:.2f}": ap + 0.2 - 0.04 * i for i in range(10)}
        (path / "eval_detail.json").write_text(json.dumps({"iteration": 10, "ap_per_iou": ap_per_iou}))
    return path


@pytest.fixture
def sweeps(tmp_path) -> Path:
    """Three seeds of smooth_l1 and huber in three sweep folders, one l1 run, one unfinished run.

    AP smooth_l1: 0.50, 0.54, 0.52 (mean 0.52, std 0.02); huber: 0.53, 0.56, 0.58.
    """
    a, b, c = tmp_path / "s0", tmp_path / "s1", tmp_path / "s2" / "nested"
    fake_run(a / "0_loss=huber,seed=0", "huber", 0, 0.53)  # found first: the default baseline is still smooth_l1
    fake_run(a / "1_loss=smooth_l1,seed=0", "smooth_l1", 0, 0.50, curve=False)  # an older run: no eval_detail
    (a / "multirun.yaml").write_text("hydra: {}\n")
    fake_run(b / "0_loss=smooth_l1,seed=1", "smooth_l1", 1, 0.54)
    fake_run(b / "1_loss=huber,seed=1", "huber", 1, 0.56, device="cuda")  # device is not part of identity
    fake_run(b / "2_loss=l1,seed=1", "l1", 1, 0.40)
    fake_run(b / "3_loss=l2,seed=1", "l1", 1, None)  # unfinished
    (b / "4_broken").mkdir(parents=True)
    (b / "4_broken" / "run.json").write_text('{"identity": {"seed": [0\n')  # not JSON: listed, not fatal
    # Newer runs: a model key added to a config file since (one value) does not split a group.
    fake_run(c / "0", "smooth_l1", 2, 0.52, model={"new_knob": 3})
    fake_run(c / "1", "huber", 2, 0.58, overrides=["loss=huber", "loss.delta=1.0", "seed=2"],  # same config
             model={"new_knob": 3})
    return tmp_path


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open() as f:
        return {row["group"]: row for row in csv.DictReader(f)}


def test_compare_runs_numbers_and_outputs(sweeps, tmp_path, capsys):
    out = tmp_path / "report"
    assert compare_runs.main([str(sweeps / "s0"), str(sweeps / "s1"), str(sweeps / "s2"), "--out", str(out)]) == 0
    rows = read_csv(out / "comparison.csv")
    assert list(rows) == ["loss=huber", "loss=smooth_l1", "loss=l1"]
    base, hub, l1 = rows["loss=smooth_l1"], rows["loss=huber"], rows["loss=l1"]
    assert (base["n"], hub["n"], l1["n"]) == ("3", "3", "1")
    assert hub["seeds"] == "0 1 2"
    assert float(base["AP"]) == pytest.approx(0.52, abs=1e-12)
    assert float(base["AP_std"]) == pytest.approx(0.02, abs=1e-12)
    assert float(hub["AP"]) == pytest.approx((0.53 + 0.56 + 0.58) / 3, abs=1e-12)
    assert float(hub["AP_std"]) == pytest.approx(math.sqrt((0.0266667**2 + 0.0033333**2 + 0.0233333**2) / 2), abs=1e-6)
    assert float(hub["AP_diff"]) == pytest.approx(0.0366667, abs=1e-6)
    assert float(hub["AP50_diff"]) == pytest.approx(0.0366667, abs=1e-6)
    # Paired differences 0.03, 0.02, 0.06: t = 3.0508, df = 2, where p = 1 - t / sqrt(2 + t^2) exactly.
    d = [0.03, 0.02, 0.06]
    m, s = sum(d) / 3, math.sqrt(sum((x - sum(d) / 3) ** 2 for x in d) / 2)
    t = m / (s / math.sqrt(3))
    assert float(hub["AP_p"]) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-9)
    assert float(hub["AP_p"]) == pytest.approx(0.0927, abs=1e-4)
    assert hub["AP_pairs"] == "3" and base["AP_p"] == ""
    assert l1["AP_std"] == "" and l1["AP_p"] == "" and l1["AP_pairs"] == "1"  # one seed: no std, no test
    assert base["APl"] == ""  # null in every run
    md = (out / "comparison.md").read_text()
    assert "| loss=smooth_l1 | 3 | 52.00 ± 2.00 |" in md and "| baseline |" in md
    assert "| loss=l1 | 1 | 40.00 |" in md and "| -14.00 | undefined | 1 |" in md  # its one pair: seed 1
    assert "3_loss=l2,seed=1`: no metrics.json (unfinished)" in md
    assert "4_broken/run.json: unreadable run record" in md
    assert "![AP at each IoU threshold](ap_per_iou.png)" in md and "Not in the AP-per-IoU figure" not in md
    for png in ("ap_per_iou.png", "ap_bar.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    text = capsys.readouterr().out
    assert "loss=huber" in text and "+3.67" in text and "0.0927" in text and "unfinished:" in text


def test_compare_runs_baseline_and_defaults(sweeps, capsys):
    assert compare_runs.main([str(sweeps), "--baseline", "loss=huber", "--metric", "AP50"]) == 0
    rows = read_csv(sweeps / "comparison.csv")  # --out defaults to the first DIR
    assert float(rows["loss=smooth_l1"]["AP50_diff"]) == pytest.approx(-0.0366667, abs=1e-6)
    assert rows["loss=huber"]["AP50_p"] == ""
    assert "ΔAP50 vs loss=huber" in capsys.readouterr().out
    assert compare_runs.main([str(sweeps), "--baseline", "loss=giou"]) == 1
    assert "--baseline 'loss=giou' is not a group" in capsys.readouterr().err


def test_compare_runs_groups_by_config_values(tmp_path):
    fake_run(tmp_path / "0", "smooth_l1", 0, 0.5, overrides=["loss=smooth_l1", "loss.beta=0.111", "seed=0"])
    run = fake_run(tmp_path / "1", "smooth_l1", 0, 0.6, overrides=["loss=smooth_l1", "loss.beta=1.0", "seed=0"])
    record = json.loads((run / "run.json").read_text())
    record["config"]["loss"]["beta"] = record["identity"]["loss.beta"] = 1.0
    (run / "run.json").write_text(json.dumps(record))
    fake_run(tmp_path / "2", "smooth_l1", 1, 0.7, overrides=["loss=smooth_l1", "seed=1"])  # beta 0.111: group 0
    runs = [load_run(p) for p in find_runs([tmp_path])]
    assert runs[0].identity["trainer.lr"] == 0.02  # the schema's default, as train.py records it
    groups = group_runs(runs)
    assert [(g.name, [r.path.name for r in g.runs]) for g in groups] == [
        ("loss.beta=0.111", ["0", "2"]), ("loss.beta=1.0", ["1"])]


def test_compare_runs_names_runs_of_different_sweeps_alike(tmp_path):
    """A plain sweep (outliers left at 0) next to a noise sweep, and a run that kept the default loss: every
    group names the loss and the outlier fraction, taken from the config or Hydra's choices where not given."""
    noise = {"noise": {"outliers": 0.0}}
    fake_run(tmp_path / "a", "smooth_l1", 0, 0.6, overrides=["loss=smooth_l1", "seed=0"], data=noise)
    fake_run(tmp_path / "b", "l1", 0, 0.5, overrides=["loss=l1", "data.noise.outliers=0.2", "seed=0"],
             data={"noise": {"outliers": 0.2}})
    fake_run(tmp_path / "c", "huber", 0, 0.4, overrides=["data.noise.outliers=0.2", "seed=0"],
             data={"noise": {"outliers": 0.2}}, choices={"loss": "huber", "data": "synthetic"})
    groups = group_runs([load_run(p) for p in find_runs([tmp_path])])
    assert [g.name for g in groups] == [
        "loss=smooth_l1,data.noise.outliers=0.0", "loss=l1,data.noise.outliers=0.2",
        "loss=huber,data.noise.outliers=0.2"]
    out = tmp_path / "report"
    assert compare_runs.main([str(tmp_path), "--out", str(out), "--x", "data.noise.outliers",
                              "--baseline", "loss=smooth_l1,data.noise.outliers=0.0"]) == 0
    assert float(read_csv(out / "comparison.csv")["loss=l1,data.noise.outliers=0.2"]["AP_diff"]) == pytest.approx(-0.1)
    # The baseline names its pairs in any order (a preset's sweep can put its keys in another order)
    assert compare_runs.main([str(tmp_path), "--out", str(out), "--baseline", "data.noise.outliers=0.0,loss=smooth_l1"]) == 0
    assert float(read_csv(out / "comparison.csv")["loss=l1,data.noise.outliers=0.2"]["AP_diff"]) == pytest.approx(-0.1)


def test_compare_runs_reads_ap_per_iou_written_later_by_evaluate(tmp_path):
    run = fake_run(tmp_path / "old", "l1", 0, 0.4, curve=False)  # older than eval_detail.json
    assert load_run(run).ap_per_iou is None
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    assert not (tmp_path / "report" / "ap_per_iou.png").exists()
    assert "AP-per-IoU figure (no eval_detail.json): loss=l1;" in (tmp_path / "report" / "comparison.md").read_text()
    curve = {"0.50": 0.6, "0.95": 0.1}
    (run / "eval").mkdir()
    (run / "eval" / "eval_detail.json").write_text(json.dumps({"stats": {"AP": 0.3}, "ap_per_iou": curve}))
    assert load_run(run).ap_per_iou is None  # another evaluation (say, another dataset): not used
    (run / "eval" / "eval_detail.json").write_text(json.dumps({"stats": {"AP": 0.4}, "ap_per_iou": curve}))
    assert load_run(run).ap_per_iou == curve


def test_compare_runs_without_finished_runs(tmp_path, capsys):
    fake_run(tmp_path / "0", "l1", 0, None)
    assert compare_runs.main([str(tmp_path)]) == 1
    assert "no finished runs" in capsys.readouterr().err


def test_sweep_callback_compares_in_process_and_never_fails_the_sweep(sweeps, caplog):
    def end(folder: Path, *args: str) -> None:
        CompareRuns(list(args)).on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(folder)}}}))

    end(sweeps / "s1", "--baseline", "loss=smooth_l1")
    assert "| loss=smooth_l1 | 1 |" in (sweeps / "s1" / "comparison.md").read_text()
    (sweeps / "empty").mkdir()
    end(sweeps / "empty")  # no finished runs: logged with the command that re-runs it, not raised
    end(sweeps / "s1", "--metric", "nope")  # argparse's exit is caught too
    failures = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(failures) == 2 and "no finished runs" in failures[0]
    assert f"detlib-compare {sweeps / 'empty'}" in failures[0] and "uv run tools/compare_runs.py" in failures[0]


def test_t_pvalue_against_closed_forms_and_tables():
    for t in (0.3, 1.0, 2.5, 12.7062):
        assert ttest.t_pvalue(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), abs=1e-12)  # Cauchy
        assert ttest.t_pvalue(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), abs=1e-12)
    assert ttest.t_pvalue(2.776445, 4) == pytest.approx(0.05, abs=1e-6)  # the t table's 97.5% points
    assert ttest.t_pvalue(2.228139, 10) == pytest.approx(0.05, abs=1e-6)
    assert ttest.t_pvalue(0.0, 5) == 1.0
    assert ttest.paired_t([1.0], [0.5]) is None


# ---------------------------------------------------------------------------------------------
# plot_losses.py


def test_plot_losses_gradients_are_the_known_ones():
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0], dtype=torch.float64)
    curves = {label: fn for label, fn, _ in plot_losses.preset("compare")[0]}
    _, g = plot_losses.value_and_grad(curves["smooth L1 (beta=1)"], x)
    assert g.tolist() == [-1.0, -0.5, 0.5, 1.0]
    v, g = plot_losses.value_and_grad(curves["L2"], x)
    assert v.tolist() == [4.0, 0.25, 0.25, 4.0] and g.tolist() == [-4.0, -1.0, 1.0, 4.0]
    (label, fn, kink), *_ = plot_losses.preset("beta")[0][2:]
    _, g = plot_losses.value_and_grad(fn, torch.tensor([0.005, 0.02], dtype=torch.float64))
    assert (label, kink) == ("smooth L1 (beta=0.01)", 0.01) and g.tolist() == pytest.approx([0.5, 1.0])


def test_plot_losses_presets_write_pngs(tmp_path, capsys):
    assert plot_losses.main(["--preset", "all", "--out-dir", str(tmp_path), "--range", "2"]) == 0
    for name in ("loss_shapes.png", "smooth_l1_beta.png"):
        with Image.open(tmp_path / name) as im:
            assert im.format == "PNG" and im.size[0] > 600
    assert "smooth_l1_beta.png" in capsys.readouterr().out


def test_plot_losses_run_adds_a_tensorboard_figure(smoke_run):
    assert plot_losses.main(["--run", str(smoke_run)]) == 0
    assert (smoke_run / "loss_shape.png").is_file()
    ea = EventAccumulator(str(smoke_run / "tb"), size_guidance={"images": 0})
    ea.Reload()
    assert "loss/shape" in ea.Tags()["images"]
    image = ea.Images("loss/shape")[-1]
    assert image.width > 600 and image.encoded_image_string.startswith(b"\x89PNG")


def test_plot_losses_box_space_loss_is_drawn_against_a_shift(tmp_path):
    run = tmp_path / "giou_run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"identity": {}, "config": {
        "seed": 0, "loss": {"_target_": "detlib.losses.GIoULoss", "weight": 10.0}}}))
    fig = plot_losses.run_figure(run, 3.0)
    assert "shifted along x" in fig._suptitle.get_text()
    loss = instantiate(load_run_config(run).loss)
    # shift 0: IoU 1; shift 0.5: IoU 1/3, enclosing box = union; shift 1: IoU 0, enclosing box = union.
    v = plot_losses.shifted_box(loss)(torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
    assert v.tolist() == pytest.approx([0.0, 10 * 2 / 3, 10.0], abs=1e-5)


# ---------------------------------------------------------------------------------------------
# visualize.py


def test_visualize_detections_file_draws_green_and_red(coco_files, tmp_path, capsys):
    dt = tmp_path / "dt.json"
    dt.write_text(json.dumps([{"image_id": 11, "category_id": 9, "bbox": [8, 8, 30, 30], "score": 0.9},
                              {"image_id": 11, "category_id": 1, "bbox": [40, 40, 10, 10], "score": 0.2}]))
    out = tmp_path / "vis"
    assert visualize.main(["--dets", str(dt), "--gt", str(coco_files["gt"]), "--images", str(coco_files["images"]),
                           "--ids", "11", "12", "--out", str(out), "--scale", "2"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["11.png", "12.png"]
    px = np.asarray(Image.open(out / "11.png").convert("RGB"))
    assert px.shape == (128, 128, 3)
    assert px[20 + 30, 20].tolist() == [0, 255, 0]  # left edge of GT box [10, 10, 40, 30] at scale 2
    assert px[16 + 30, 16].tolist() == [255, 0, 0]  # left edge of the 0.9 prediction [8, 8, 30, 30]
    assert px[80 + 10, 80].tolist() == [90, 90, 90]  # the 0.2 prediction is under --score-thresh 0.5
    assert "11.png: 3 ground truth, 1 predictions" in capsys.readouterr().out
    assert visualize.main(["--dets", str(dt), "--gt", str(coco_files["gt"]), "--images", str(coco_files["images"]),
                           "--ids", "77"]) == 1
    assert "image ids not in" in capsys.readouterr().err


def test_visualize_run_writes_n_pngs_and_agrees_with_its_detections_file(smoke_run, smoke_eval, tmp_path, capsys):
    out = tmp_path / "vis"
    assert visualize.main(["--run", str(smoke_run), "--num", "3", "--out", str(out), "--device", "cpu",
                           "--score-thresh", "0.0"]) == 0
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 3
    with Image.open(pngs[0]) as im:
        assert im.size == (3 * 128, 3 * 128)
    from_run = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    # The same checkpoint through evaluate.py's detections file draws the same boxes.
    assert visualize.main(["--dets", str(smoke_eval[0] / "dets.json"), "--gt", str(smoke_val_ann(smoke_run)),
                           "--images", str(smoke_val_ann(smoke_run).parent), "--num", "3", "--out", str(tmp_path / "v2"),
                           "--score-thresh", "0.0"]) == 0
    from_file = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]
    assert from_run == from_file
    assert sum(int(line.split(", ")[1].split()[0]) for line in from_run) > 0  # some predictions are drawn


def test_compare_runs_plots_the_metric_against_a_config_key(tmp_path, capsys):
    """loss_study_robust's figure: AP against the outlier fraction, one line per loss."""
    ap = {("l1", 0.0): (0.50, 0.52), ("l1", 0.4): (0.46, 0.48), ("huber", 0.0): (0.55, 0.57), ("huber", 0.4): (0.40, 0.44)}
    for k, ((loss, p), aps) in enumerate(ap.items()):
        for seed, v in enumerate(aps):
            fake_run(tmp_path / f"{k}_{seed}", loss, seed, v, data={"noise": {"outliers": p}},
                     overrides=[f"loss={loss}", f"data.noise.outliers={p}", f"seed={seed}"])
    groups = group_runs([load_run(p) for p in find_runs([tmp_path])])
    points = plot_against(groups, "data.noise.outliers", "AP", tmp_path / "f.png")
    assert set(points) == {"loss=l1", "loss=huber"}
    assert [x for x, _ in points["loss=huber"]] == [0.0, 0.4]
    assert [m for _, m in points["loss=huber"]] == pytest.approx([0.56, 0.42])
    assert [m for _, m in points["loss=l1"]] == pytest.approx([0.51, 0.47])
    out = tmp_path / "report"
    assert compare_runs.main([str(tmp_path), "--x", "data.noise.outliers", "--baseline",
                              "loss=l1,data.noise.outliers=0.0", "--out", str(out)]) == 0
    assert (out / "AP_vs_data_noise_outliers.png").stat().st_size > 5000
    assert "AP_vs_data_noise_outliers.png" in (out / "comparison.md").read_text()
    assert compare_runs.main([str(tmp_path), "--x", "data.nope"]) == 1


def recorded_run(path: Path, loss: str, seed: int, ap: float, train_fp: str = "a" * 64, **identity: object) -> Path:
    """A run folder as train.py now writes it: run.json (the identity), metrics.json; .hydra/ says otherwise."""
    fake_run(path, "huber", 99, ap)  # Hydra's rewritable files, deliberately wrong
    ident = {"seed": seed, "loss._target_": f"detlib.losses.{loss}", "trainer.max_iters": 10, "world_size": 1,
             "data.fingerprint.train": train_fp, "data.fingerprint.val": "b" * 64} | identity
    (path / "run.json").write_text(json.dumps({"identity": ident, "overrides": [f"loss={loss.lower()}", f"seed={seed}"],
                                               "choices": {"loss": loss.lower()}, "config": {}}))
    return path


def test_compare_runs_reads_the_record_not_hydra_files_and_keeps_different_data_apart(tmp_path, capsys):
    recorded_run(tmp_path / "0_a", "L1", 0, 0.50)
    recorded_run(tmp_path / "1_a", "L1", 1, 0.52)
    recorded_run(tmp_path / "2_b", "L1", 0, 0.30, train_fp="c" * 64)  # same set-up, other annotation file
    recorded_run(tmp_path / "3_c", "L2", 0, 0.40)
    recorded_run(tmp_path / "4_c", "L2", 0, 0.42)  # a second run of seed 0
    assert compare_runs.main([str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    rows = list(csv.DictReader((tmp_path / "comparison.csv").open()))
    sizes = sorted(int(r["n"]) for r in rows)
    assert sizes == [1, 2, 2], rows  # L1 on data a, L1 on data c, L2: never L1 on both data in one group
    assert not any("huber" in r["group"] for r in rows)  # the .hydra files are not read
    assert "runs share seed 0" in err and "4_c" in err


def test_compare_runs_reports_tide_errors_and_tp_iou_per_group_with_ci(tmp_path, capsys):
    from scipy import stats as sps

    from detlib.evaluation.tide import ERRORS
    from detlib.tools.compare_errors import error_rows

    loc = {"smooth_l1": [0.020, 0.024, 0.022], "l1": [0.030, 0.036, 0.033]}
    for loss, values in loc.items():
        for seed, v in enumerate(values):
            run = fake_run(tmp_path / f"{loss}_{seed}", loss, seed, 0.5 + v, curve=False)
            hist = [0] * 19 + [10] if loss == "smooth_l1" else [10] + [0] * 19
            detail = {"stats": {"AP": 0.5 + v}, "tide": {"dAP": dict.fromkeys(ERRORS, 0.01) | {"Loc": v}},
                      "tp_iou": {"mean": 0.9 if loss == "smooth_l1" else 0.6, "hist": hist}}
            (run / "eval_detail.json").write_text(json.dumps(detail))
    groups = group_runs([load_run(p) for p in find_runs([tmp_path])])
    rows = {r["group"]: r for r in error_rows(groups)}
    mean, half = rows["loss=l1"]["dAP Loc"]
    assert mean == pytest.approx(0.033)
    assert half == pytest.approx(sps.t.ppf(0.975, 2) * np.std(loc["l1"], ddof=1) / np.sqrt(3))
    assert rows["loss=smooth_l1"]["TP IoU mean"] == (pytest.approx(0.9), 0.0)
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    md = (tmp_path / "report" / "comparison.md").read_text()
    assert "## Which errors (TIDE" in md and "| loss=l1 | 3 | 1.00 ± 0.00 | 3.30 ± 0.75 |" in md
    for name in ("tide.png", "tp_iou.png"):
        assert (tmp_path / "report" / name).stat().st_size > 5000


def test_plot_losses_presets_do_not_write_into_the_repository_by_default():
    assert plot_losses.parse_args(["--preset", "all"]).out_dir == Path("loss_plots")


def test_plot_logs_draws_the_keys_of_runs_from_metrics_jsonl(trained, tmp_path, capsys):
    run_dir, _, _ = trained
    assert plot_logs.main([str(run_dir), "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert {"loss/total", "lr", "val/AP", "val/loss"} <= set(listed)
    out = tmp_path / "c.png"
    assert plot_logs.main([str(run_dir), str(run_dir), "--keys", "loss/total", "val/AP", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[1] > 600  # one panel per key, stacked
    assert plot_logs.main([str(run_dir), "--keys", "train/nope"]) == 1
    assert "not logged by these runs" in capsys.readouterr().err
    assert plot_logs.main([str(tmp_path)]) == 1


def test_plot_logs_reads_the_losses_and_lr_of_an_older_run_under_todays_names(tmp_path, capsys):
    old, new = tmp_path / "old", tmp_path / "new"  # an older detlib logged them under train/
    for run, rows in ((old, [{"iteration": 2, "train/loss": 1.5, "train/loss_box_reg": 0.5, "train/lr": 0.02,
                              "train/fg_iou": 0.7}]),
                      (new, [{"iteration": 2, "loss/total": 1.2, "loss/box_reg": 0.4, "lr": 0.02, "train/fg_iou": 0.8}])):
        run.mkdir()
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plot_logs.read_log(old) == [{"iteration": 2, "loss/total": 1.5, "loss/box_reg": 0.5, "lr": 0.02,
                                        "train/fg_iou": 0.7}]
    assert plot_logs.main([str(old), "--list"]) == 0
    assert capsys.readouterr().out.split() == ["loss/box_reg", "loss/total", "lr", "train/fg_iou"]
    out = tmp_path / "c.png"
    for keys in (["loss/box_reg", "lr"], ["train/loss_box_reg", "train/lr"]):  # the old names are accepted too
        assert plot_logs.main([str(old), str(new), "--keys", *keys, "--out", str(out)]) == 0
    assert plot_logs.series(plot_logs.read_log(old), "loss/box_reg") == ([2], [0.5])


def test_evaluate_file_mode_writes_only_what_it_is_told_and_needs_no_torch(coco_files, tmp_path):
    out = tmp_path / "only" / "m.json"
    assert evaluate.main(["--gt", str(coco_files["gt"]), "--dt", str(coco_files["dt"]), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.json"]
    code = ("import sys; from detlib.tools import evaluate; "
            f"evaluate.main(['--gt', {str(coco_files['gt'])!r}, '--dt', {str(coco_files['dt'])!r}]); "
            "print('torch' in sys.modules, 'omegaconf' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False False"  # scoring files imports neither torch nor omegaconf


def test_compare_runs_lists_diverged_runs(tmp_path):
    fake_run(tmp_path / "a", "smooth_l1", 0, 0.5)
    bad = fake_run(tmp_path / "b", "l1", 0, 0.0)
    (bad / "diverged.json").write_text(json.dumps({"reason": "non-finite loss at iteration 7"}))
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "comparison.md").read_text()
    assert "## Diverged runs" in md and "non-finite loss at iteration 7" in md and "`" + str(bad) + "`" in md


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
])
def test_a_cuda_failure_in_a_tool_keeps_its_traceback(error, capsys):
    """Bad input is one line; an out-of-memory or CUDA error is not bad input and must not be shortened."""
    from detlib.tools.cli import cli

    def run(_argv):
        raise error

    with pytest.raises(type(error)):
        cli(run, [], "evaluate.py")
    assert "error:" not in capsys.readouterr().err

    def bad_input(_argv):
        raise RuntimeError("checkpoint x.pt does not fit the run's model")

    assert cli(bad_input, [], "evaluate.py") == 1
    assert capsys.readouterr().err == "evaluate.py: error: checkpoint x.pt does not fit the run's model\n"


def test_an_omegaconf_error_is_still_one_line_though_file_mode_never_imports_omegaconf(capsys):
    """``cli`` catches omegaconf's errors once omegaconf is imported (it is here), without importing it itself."""
    from omegaconf.errors import ConfigKeyError

    from detlib.tools.cli import cli

    def bad_key(_argv):
        raise ConfigKeyError("Key 'lrr' is not in struct")

    assert cli(bad_key, [], "predict.py") == 1
    assert capsys.readouterr().err == "predict.py: error: Key 'lrr' is not in struct\n"


GOOD = {"image_id": 10, "category_id": 1, "bbox": [1.5, 2, 3, 4.25], "score": 0.5}


@pytest.mark.parametrize("entry,ok", [
    ({}, True), ({"bbox": [1, 2, 3, 4], "score": 1}, True), ({"extra": "kept"}, True),
    ({"bbox": [1, 2, 3, True]}, False), ({"score": False}, False), ({"bbox": [1, 2, "3", 4]}, False),
    ({"bbox": [1, 2, 3]}, False), ({"bbox": [1, 2, 3, 4, 5]}, False), ({"bbox": [1, 2, 0, 4]}, False),
    ({"bbox": [1, 2, 3, -4]}, False), ({"bbox": [1, 2, 3, float("nan")]}, False), ({"score": float("inf")}, False),
    ({"score": "0.5"}, False), ({"bbox": "1234"}, False), ({"bbox": [1, 2, 3, 10**400]}, False),
    ({"score": -(10**400)}, False),
])
def test_the_fast_results_check_accepts_exactly_what_the_entry_by_entry_check_does(tmp_path, entry, ok):
    """``read_results`` checks a whole file in a few passes and scans entry by entry only to name a bad one."""
    from detlib.tools.results import _check_entry, _well_formed

    bad = {**GOOD, **entry}
    data = [GOOD, bad]
    assert _well_formed(data) is ok and _well_formed([]) and _well_formed([GOOD])
    if ok:
        _check_entry("dt.json", 1, bad)
    else:
        with pytest.raises(ToolError, match="dt.json: entry 1"):
            _check_entry("dt.json", 1, bad)
    for missing in RESULT_FIELDS:
        assert not _well_formed([GOOD, {k: v for k, v in GOOD.items() if k != missing}])
    assert not _well_formed([GOOD, [1, 2]]) and not _well_formed([GOOD, "x"])


def test_compare_runs_delta_ci_and_p_are_over_the_same_pairs_and_unpaired_seeds_are_named(tmp_path, capsys):
    base = [0.50, 0.52, 0.40, 0.40, 0.40]  # seeds 0-4
    for seed, ap in enumerate(base):
        fake_run(tmp_path / f"b{seed}", "smooth_l1", seed, ap)
    fake_run(tmp_path / "l0", "l1", 0, 0.53)  # seeds 0-1 only: paired differences +3 and +4 points
    fake_run(tmp_path / "l1", "l1", 1, 0.56)
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    row = read_csv(tmp_path / "r" / "comparison.csv")["loss=l1"]
    diff, lo, hi = float(row["AP_diff"]), float(row["AP_ci_lo"]), float(row["AP_ci_hi"])
    assert diff == pytest.approx(0.035)  # over the pairs, not the means of unequal seed sets (+10.10)
    assert lo < diff < hi and row["AP_pairs"] == "2"
    assert row["AP_unpaired"] == "seeds 2 3 4 only in the baseline"
    md = (tmp_path / "r" / "comparison.md").read_text()
    assert "| +3.50 |" in md and "seeds 2 3 4 only in the baseline" in md and "+10.10" not in md


def test_compare_runs_shows_zero_spread_statistics_as_undefined_with_the_reason(tmp_path, capsys):
    for seed, ap in enumerate([0.50, 0.52, 0.40]):
        fake_run(tmp_path / f"b{seed}", "smooth_l1", seed, ap)
        fake_run(tmp_path / f"l{seed}", "l1", seed, ap + 0.02)  # +2 points on every seed
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    row = read_csv(tmp_path / "r" / "comparison.csv")["loss=l1"]
    assert float(row["AP_diff"]) == pytest.approx(0.02)
    assert row["AP_p"] == row["AP_ci_lo"] == row["AP_mde"] == "" and "no spread" in row["AP_undefined"]
    line = next(x for x in (tmp_path / "r" / "comparison.md").read_text().splitlines() if x.startswith("| loss=l1"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[-6:-1] == ["+2.00", "undefined", "3", "undefined", "undefined"], cells
    assert "all 3 paired differences are equal (+2.00 points)" in cells[-1]
    assert "±0.00" not in line


def test_compare_runs_keeps_runs_at_other_inference_settings_apart_and_does_not_call_them_one_setup(tmp_path, capsys):
    """score_thresh and detections_per_img are not in run_record's identity (they may change on resume) but change
    the metrics: two runs of one seed at other settings are two groups, not one set-up averaged."""
    eval_keys = {"model.roi_head.score_thresh": 0.05, "model.roi_head.detections_per_img": 100}
    for name, ap, settings in (("a", 0.00126, {}), ("b", 0.0, {"model.roi_head.score_thresh": 0.99}),
                               ("c", 0.3, {"model.roi_head.detections_per_img": 1})):
        run = recorded_run(tmp_path / name, "L1", 0, ap)
        record = json.loads((run / "run.json").read_text())
        record["eval"] = eval_keys | settings
        (run / "run.json").write_text(json.dumps(record))
    # a resume at another threshold: metrics.json holds what eval_detail.json's settings produced
    late = recorded_run(tmp_path / "d", "L1", 0, 0.2)
    record = json.loads((late / "run.json").read_text())
    (late / "run.json").write_text(json.dumps(record | {"eval": eval_keys}))
    (late / "eval_detail.json").write_text(json.dumps({"stats": {"AP": 0.2},
                                                       "eval_settings": eval_keys | {"model.roi_head.score_thresh": 0.5}}))
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    err = capsys.readouterr().err
    rows = read_csv(tmp_path / "r" / "comparison.csv")
    assert sorted(r["n"] for r in rows.values()) == ["1", "1", "1", "1"], rows
    assert "share seed" not in err
    assert any("score_thresh=0.99" in g for g in rows) and any("detections_per_img=1" in g for g in rows)


def test_a_diverged_run_writes_null_where_coco_has_no_such_objects(coco_files, tmp_path):
    """The val set has no large objects: a finished run's APl and ARl are null, so a diverged run's are too
    (they were 0.0); AP and the small/medium stats are 0, the collapse it is."""
    import train
    from detlib.engine.guards import NonFiniteLossError
    from detlib.evaluation.coco_eval import evaluate_coco

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(coco_files["gt"]))
    finished, _ = evaluate_coco(gt, json.loads(coco_files["dt"].read_text()))
    stats = train.record_divergence(tmp_path, NonFiniteLossError("non-finite loss at iteration 2\n..."), gt,
                                    [1, 10, 100])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == stats and list(written) == list(STAT_NAMES)
    assert written["APl"] is None and written["ARl"] is None
    assert {k for k, v in written.items() if v is None} == {k for k, v in finished.items() if v is None}
    assert {v for v in written.values() if v is not None} == {0.0}
    assert json.loads((tmp_path / "diverged.json").read_text()) == {"reason": "non-finite loss at iteration 2"}


def test_compare_runs_does_not_average_a_diverged_runs_fake_zero_into_a_null_metric(tmp_path):
    """A diverged run written by older detlib (0.0 everywhere) next to finished runs whose APl is null."""
    fake_run(tmp_path / "a0", "l1", 0, 0.5)
    fake_run(tmp_path / "a1", "smooth_l1", 0, 0.5)
    old = fake_run(tmp_path / "a2", "l1", 1, 0.0)
    (old / "metrics.json").write_text(json.dumps(dict.fromkeys(STAT_NAMES, 0.0)))
    (old / "diverged.json").write_text(json.dumps({"reason": "non-finite loss at iteration 7"}))
    assert compare_runs.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 0
    row = read_csv(tmp_path / "r" / "comparison.csv")["loss=l1"]
    assert row["n"] == "2" and float(row["AP"]) == pytest.approx(0.25)  # AP 0 is what it scored: averaged in
    assert row["APl"] == ""  # null in every finished run: no large objects, not a 0
