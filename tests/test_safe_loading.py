"""Loading a file never runs code: checkpoints, proposals files, and the tools that read them.

Each crafted file below would create a marker file if it were unpickled the ordinary way; every entry
point must refuse it with an error naming the file, and the marker must never appear. The tools'
output file names never come from the data unsanitised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import random
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from detlib.data.build import build_datasets
from detlib.data.synthetic import CLASSES
from detlib.engine import checkpoint
from detlib.engine import restore as rundir  # noqa: E402
from detlib.engine.build import build_model
from detlib.engine.trainer import Job, RunMeta, train
from detlib.modeling.proposals import FileProposals, ProposalError, build_proposal_source
from detlib.tools import evaluate, visualize  # noqa: E402

from .conftest import ROOT, compose_cfg


class RunsShellCommand:
    """Unpickled the ordinary way, this runs ``touch MARKER`` in a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


class OpensFileForWriting:
    """Unpickled the ordinary way, this creates ``MARKER`` with ``open(MARKER, "w")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


PAYLOADS = {"os.system": RunsShellCommand, "open": OpensFileForWriting}


def crafted_checkpoint(path: Path, marker: Path, payload: str = "os.system", how: str = "torch.save") -> Path:
    """A file that looks like a detlib checkpoint but carries an object that creates ``marker``."""
    state = {"model": {"w": torch.zeros(2)}, "iteration": 3, "meta": {"note": PAYLOADS[payload](marker)}}
    if how == "torch.save":
        torch.save(state, path)
    elif how == "torch.save legacy":
        torch.save(state, path, _use_new_zipfile_serialization=False)
    else:  # a bare pickle, as an attacker could write without torch
        path.write_bytes(pickle.dumps(state, protocol=2))
    return path


# ---------------------------------------------------------------------------------------------
# Checkpoints


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("how", ["torch.save", "torch.save legacy", "pickle protocol 2"])
def test_crafted_checkpoint_is_refused_without_running_code(tmp_path, payload, how):
    marker = tmp_path / "MARKER"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker, payload, how)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    assert not marker.exists(), "loading the checkpoint ran the code inside it"
    msg = str(e.value)
    assert str(path) in msg and "not plain data" in msg and "does not execute code" in msg


def test_checkpoint_with_numpy_rng_state_from_an_older_detlib_names_the_file(tmp_path):
    """Before RNG states were plain data, checkpoints held numpy's RNG state as a numpy object."""
    path = tmp_path / "old.pt"
    torch.save({"model": {}, "iteration": 10, "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                                                       "torch": torch.get_rng_state(), "cuda": []}}, path)
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert str(path) in msg and "not plain data" in msg and "numpy" in msg and "older detlib" in msg


def test_rng_state_is_plain_data_and_restores_every_generator_bit_for_bit(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1), np.random.randn()  # leave a cached gaussian in both, which the state must carry

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(),
                torch.rand(3).tolist())

    path = checkpoint.save({"model": {}, "iteration": 1, "rng": checkpoint.rng_state()}, tmp_path, 1)
    expected = draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    checkpoint.set_rng_state(torch.load(path, map_location="cpu", weights_only=True)["rng"])
    assert draws() == expected


@pytest.fixture(scope="module")
def parts(data_root):
    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.progress=false", "trainer.device=cpu")
    typed = OmegaConf.to_object(cfg)
    train_set, val_set = build_datasets(typed.data)
    return cfg, typed, train_set, val_set


def _train(parts, run_dir: Path, **trainer) -> dict | None:
    cfg, typed, train_set, val_set = parts
    torch.manual_seed(0)
    model = build_model(cfg, train_set.num_classes)
    tcfg = dataclasses.replace(typed.trainer, **trainer)
    meta = RunMeta({"seed": typed.seed, "loss": "l1", "tags": ["a", None, 1.5]}, {"period": 0})
    return train(Job(model, train_set, val_set, dataclasses.replace(typed, trainer=tcfg), run_dir, meta))


def test_everything_the_trainer_stores_loads_as_plain_data(parts, tmp_path):
    _train(parts, tmp_path, max_iters=2, checkpoint_period=1, eval_period=0)
    files = sorted((tmp_path / "checkpoints").glob("*.pt"))
    assert files
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=True)  # raises on anything but plain data
        assert state["iteration"] in (1, 2) and "rng" in state and "optimizer" in state


def test_resume_refuses_a_crafted_checkpoint_without_running_code(parts, tmp_path):
    marker = tmp_path / "MARKER"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(checkpoint.CheckpointError) as e:
        _train(parts, tmp_path / "run", max_iters=2, resume=str(path))
    assert not marker.exists(), "resuming ran the code inside the checkpoint"
    assert str(path) in str(e.value) and "not plain data" in str(e.value)


# ---------------------------------------------------------------------------------------------
# The tools' --checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_root) -> Path:
    """A run directory as the tools read it (its resolved config), without training: the crafted
    checkpoint is all the tools get to load."""
    run = tmp_path_factory.mktemp("run")
    cfg = compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.device=cpu")
    classes = [{"id": i, "name": n} for i, n in enumerate(CLASSES, 1)]  # as train.py records them
    (run / "run.json").write_text(json.dumps({"identity": {}, "config": OmegaConf.to_container(cfg), "classes": classes}))
    return run


@pytest.mark.parametrize("tool", ["evaluate", "visualize"])
def test_tools_refuse_a_crafted_checkpoint_without_running_code(tool, run_dir, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker)
    module = {"evaluate": evaluate, "visualize": visualize}[tool]
    assert module.main(["--run", str(run_dir), "--checkpoint", str(path), "--device", "cpu",
                        "--out", str(tmp_path / "out")]) == 1
    assert not marker.exists(), f"{tool}.py ran the code inside the checkpoint"
    err = capsys.readouterr().err
    assert err.startswith(f"{tool}.py: error: checkpoint {path} contains objects that are not plain data")


def test_evaluate_script_refuses_a_crafted_checkpoint_from_the_command_line(run_dir, tmp_path):
    marker = tmp_path / "MARKER"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker, "open")
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), "--run", str(run_dir),
                           "--checkpoint", str(path), "--device", "cpu", "--out", str(tmp_path / "m.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and not marker.exists()
    assert "not plain data" in proc.stderr and str(path) in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Proposals files


DETECTRON2 = {"ids": [4, 5], "boxes": [np.array([[1, 2, 3, 4], [0, 0, 8, 8]], np.float32), np.zeros((0, 4))],
              "objectness_logits": [np.array([0.3, 0.7], np.float32), np.zeros(0, np.float32)], "bbox_mode": 1}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_crafted_proposals_pickle_is_refused_without_running_code(tmp_path, payload, protocol):
    marker = tmp_path / "MARKER"
    data = {**DETECTRON2, "objectness_logits": [PAYLOADS[payload](marker), np.zeros(0)]}
    path = tmp_path / "proposals.pkl"
    path.write_bytes(pickle.dumps(data, protocol=protocol))
    with pytest.raises(ProposalError) as e:
        build_proposal_source(file=str(path))
    assert not marker.exists(), "reading the proposals ran the code inside them"
    # pickle names open's module as io (Python 3.11) or _io (3.12)
    refused = {"os.system": f"{os.name}.system", "open": f"{pickle.whichmodule(open, 'open')}.open"}[payload]
    assert str(path) in str(e.value) and f"refused to load {refused}" in str(e.value)


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_detectron2_proposals_pickle_still_loads(tmp_path, protocol):
    path = tmp_path / "proposals.pkl"
    path.write_bytes(pickle.dumps({**DETECTRON2, "extra": {"scale": np.float32(1.5), "ok": {1, 2}}}, protocol=protocol))
    src = FileProposals(str(path))
    assert src.boxes[4].tolist() == [[0, 0, 8, 8], [1, 2, 4, 6]]  # by score, xywh -> xyxy
    assert src.boxes[5].shape == (0, 4)


def test_npz_proposals_in_detectron2_layouts_load_without_pickle(tmp_path):
    ragged = tmp_path / "ragged.npz"
    np.savez(ragged, ids=np.array([4, 5]), boxes=np.array([[1, 2, 3, 4], [0, 0, 8, 8], [1, 1, 2, 2]], np.float32),
             counts=np.array([2, 1]), objectness_logits=np.array([0.3, 0.7, 0.1]), bbox_mode=np.array(1))
    src = FileProposals(str(ragged))
    assert src.boxes[4].tolist() == [[0, 0, 8, 8], [1, 2, 4, 6]] and src.boxes[5].tolist() == [[1, 1, 3, 3]]
    padded = tmp_path / "padded.npz"
    np.savez(padded, ids=np.array([7, 8]), boxes=np.tile(np.array([[0, 0, 1, 1], [0, 0, 5, 5]], np.float32), (2, 1, 1)),
             scores=np.array([[0.1, 0.9], [0.8, 0.2]]))
    src = FileProposals(str(padded), top_k=1)
    assert src.boxes[7].tolist() == [[0, 0, 5, 5]] and src.boxes[8].tolist() == [[0, 0, 1, 1]]
    per_id = tmp_path / "per_id.npz"
    np.savez(per_id, **{"3": np.array([[0, 0, 2, 2]])})
    assert FileProposals(str(per_id)).boxes[3].tolist() == [[0, 0, 2, 2]]


def test_npz_proposals_with_object_arrays_or_bad_counts_are_refused(tmp_path):
    marker = tmp_path / "MARKER"
    objects = tmp_path / "objects.npz"
    np.savez(objects, ids=np.array([4]), boxes=np.array([RunsShellCommand(marker), None], dtype=object))
    with pytest.raises(ProposalError, match="objects.npz: cannot read proposals.*allow_pickle=False"):
        FileProposals(str(objects))
    assert not marker.exists()
    counts = tmp_path / "counts.npz"
    np.savez(counts, ids=np.array([4, 5]), boxes=np.zeros((3, 4)), counts=np.array([1, 1]))
    with pytest.raises(ProposalError, match=r"counts.npz: 'counts' must be 2 non-negative integers summing to the 3"):
        FileProposals(str(counts))


def test_proposals_file_of_unknown_format_is_refused(tmp_path):
    path = tmp_path / "proposals.bin"
    path.write_bytes(pickle.dumps(DETECTRON2))
    with pytest.raises(ProposalError, match=r"proposals.bin: unknown proposals format '.bin'; use .json, .npz"):
        FileProposals(str(path))


# ---------------------------------------------------------------------------------------------
# Output file names


@pytest.mark.parametrize("image_id", ["../../escape", "..", ".", "a/../../b", "/abs/escape", "x" * 400, 17])
def test_visualize_output_path_stays_inside_out_whatever_the_image_id(tmp_path, image_id):
    """Image ids that look like paths (dot-dot, absolute, separators) still name a file directly in --out."""
    out = tmp_path / "a" / "b" / "out"
    out.mkdir(parents=True)
    path = visualize.output_path(out, image_id)
    assert path.parent == out and path.resolve().parent == out.resolve() and path.suffix == ".png"
    visualize.write_png(torch.zeros((3, 2, 2), dtype=torch.uint8), str(path))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]


def test_image_ids_map_to_distinct_plain_file_names():
    ids = [17, "17", "a/b", "a_b", "..", ".", "", "x" * 300, "../../etc/passwd", "/abs", "\u00e9", -3]
    names = [visualize.safe_name(i) for i in ids]
    assert names[0] == names[1] == "17.png" and visualize.safe_name("a_b") == "a_b.png" and names[-1] == "-3.png"
    assert len(set(names[1:])) == len(ids) - 1
    for n in names:
        assert set(n) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        assert not n.startswith(".") and len(n) < 200


def test_visualize_writes_one_file_per_image_inside_out(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    ids = [17, 3, 1_000_000_007]
    gt_images = []
    for image_id in ids:
        Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(images / f"{image_id}.png")
        gt_images.append({"id": image_id, "file_name": f"{image_id}.png", "width": 32, "height": 32})
    anns = [{"id": k + 1, "image_id": image_id, "category_id": 1, "bbox": [2, 2, 10, 10], "area": 100, "iscrowd": 0}
            for k, image_id in enumerate(ids)]
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"images": gt_images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}))
    dt = tmp_path / "dt.json"
    dt.write_text(json.dumps([{"image_id": 17, "category_id": 1, "bbox": [2, 2, 9, 9], "score": 0.9}]))
    out = tmp_path / "a" / "b" / "out"
    before = {p for p in tmp_path.rglob("*") if p.is_file()}
    assert visualize.main(["--dets", str(dt), "--gt", str(gt), "--images", str(images), "--num", "3",
                           "--out", str(out), "--scale", "1"]) == 0, capsys.readouterr().err
    written = {p for p in tmp_path.rglob("*") if p.is_file()} - before
    assert written == {out / f"{i}.png" for i in ids}


def test_a_run_config_naming_a_foreign_target_is_refused_without_running_code(tmp_path):
    """A run folder is data: the tools instantiate only detlib/torch/torchvision classes from it."""
    marker = tmp_path / "MARKER"
    cfg = OmegaConf.create({"model": {"_target_": "detlib.modeling.detector.build_faster_rcnn",
                                      "backbone": {"_target_": "builtins.open", "_args_": [str(marker), "w"]}},
                            "loss": {"_target_": "detlib.losses.L1"}, "rpn_loss": {"_target_": "detlib.losses.L1"}})
    with pytest.raises(rundir.ToolError, match=r"model\.backbone\._target_ = 'builtins\.open'"):
        rundir.build_from_run(cfg)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# A run folder's config names only detlib's own components (exact names, not prefixes)


def _run_with_backbone(tmp_path: Path, data_root: Path, backbone: dict) -> Path:
    """A run folder whose ``run.json`` config builds ``backbone`` as the model's backbone."""
    cfg = OmegaConf.to_container(compose_cfg("experiment=smoke", f"data.root={data_root}", "trainer.device=cpu"))
    cfg["model"]["backbone"] = backbone
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"config": cfg}))
    return run


def _payloads(tmp_path: Path, marker: Path) -> dict[str, dict]:
    """Backbones that create ``marker`` when instantiated: inline Python, and a local ``hubconf.py``."""
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef evil(**kw):\n    return None\n")
    return {
        "PyCodeCache.load": {"_target_": "torch._inductor.codecache.PyCodeCache.load",
                             "source_code": f"open({str(marker)!r}, 'w').close()\n"},
        "torch.hub.load": {"_target_": "torch.hub.load", "repo_or_dir": str(hub), "model": "evil", "source": "local"},
    }


@pytest.mark.parametrize("payload", ["PyCodeCache.load", "torch.hub.load"])
@pytest.mark.parametrize("tool", ["predict", "evaluate", "export"])
def test_a_run_config_naming_a_torch_function_that_runs_code_is_refused(tool, payload, tmp_path, data_root,
                                                                         capsys):
    from detlib.tools import export, predict

    marker = tmp_path / "MARKER"
    backbone = _payloads(tmp_path, marker)[payload]
    run = _run_with_backbone(tmp_path, data_root, backbone)
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((32, 32, 3), 90, np.uint8)).save(images / "a.png")
    argv = {"predict": ["--run", str(run), "--images", str(images), "--out", str(tmp_path / "p"), "--device", "cpu"],
            "evaluate": ["--run", str(run), "--device", "cpu", "--out", str(tmp_path / "e")],
            "export": ["--run", str(run), "--out", str(tmp_path / "m.ts")]}[tool]
    module = {"predict": predict, "evaluate": evaluate, "export": export}[tool]
    assert module.main(argv) == 1
    assert not marker.exists(), f"{tool}.py ran code named by the run's config"
    err = capsys.readouterr().err
    assert f"model.backbone._target_ = {backbone['_target_']!r} is not one of detlib's components" in err


def test_a_target_made_by_an_interpolation_is_checked_resolved(tmp_path):
    marker = tmp_path / "MARKER"
    cfg = OmegaConf.create({"model": {"backbone": "${oc.decode:'{_target_: builtins.open, _args_: [" + str(marker)
                                      + ", w]}'}"}})
    with pytest.raises(rundir.ToolError, match=r"model\.backbone\._target_ = 'builtins\.open'"):
        rundir.check_targets(cfg)
    assert not marker.exists()


def test_trusted_targets_from_the_environment_are_exact_names(monkeypatch):
    cfg = OmegaConf.create({"loss": {"_target_": "mypkg.losses.Mine"}})
    with pytest.raises(rundir.ToolError, match="mypkg.losses.Mine"):
        rundir.check_targets(cfg)
    monkeypatch.setenv("DETLIB_TRUSTED_TARGETS", "mypkg.losses.Mine, other.Thing")
    rundir.check_targets(cfg)
    monkeypatch.setenv("DETLIB_TRUSTED_TARGETS", "mypkg.")
    with pytest.raises(rundir.ToolError, match="'mypkg.' is not an exact qualified name"):
        rundir.check_targets(cfg)
    monkeypatch.setenv("DETLIB_TRUSTED_TARGETS", "mypkg.losses")  # a module is a name, not a prefix: Mine refused
    with pytest.raises(rundir.ToolError, match="mypkg.losses.Mine"):
        rundir.check_targets(cfg)


def test_every_target_detlib_configs_name_is_trusted():
    """A run trained from detlib's own configs can always be read back by the tools."""
    import yaml

    named = set()
    for path in (ROOT / "configs").rglob("*.yaml"):
        if "hydra" in path.parts:
            continue
        named |= {v for _, v in rundir.flatten_targets(yaml.safe_load(path.read_text()) or {})}
    named -= {t for t in named if t.startswith("detlib.tools.sweep_callbacks.")}  # hydra callbacks, not run.json
    assert named and named <= rundir.TRUSTED_TARGETS, named - rundir.TRUSTED_TARGETS
