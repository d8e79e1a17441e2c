"""TorchScript export: the traced model's detections equal the eager model's, on images it was not traced on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

import detlib
from detlib.data.image import read_image
from detlib.export import export_torchscript
from detlib.tools import export
from tests.conftest import ROOT


def test_traced_model_detects_as_the_eager_one_on_other_images_and_sizes(trained, tmp_path):
    run_dir, val_ann, _ = trained
    p = detlib.Predictor.from_run(run_dir, device="cpu")
    images = [read_image(val_ann.parent / i["file_name"]) for i in json.loads(val_ann.read_text())["images"][:4]]
    first = p.model([images[0]], None, detect=True)["detections"][0]["scores"]
    p.model.roi_head.score_thresh = float(first[len(first) // 2])  # so detection counts differ between images
    traced = export_torchscript(p.model, images[0], tmp_path / "model.ts")
    loaded = torch.jit.load(str(tmp_path / "model.ts"))
    others = images[1:] + [torch.full((3, 128, 128), 0.5),  # blank
                           torch.nn.functional.interpolate(images[1][None], size=(96, 160))[0]]  # another size
    counts = set()
    with torch.no_grad():
        for image in others:
            eager = p.model([image], None, detect=True)["detections"][0]
            for module in (traced, loaded):
                boxes, scores, labels = module(image)
                torch.testing.assert_close(boxes, eager["boxes"], atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(scores, eager["scores"], atol=1e-5, rtol=1e-4)
                assert torch.equal(labels, eager["labels"])
            counts.add(len(eager["boxes"]))
    assert len(counts) > 1  # the data-dependent number of detections is traced, not frozen


def test_export_tool_writes_a_loadable_file(trained, tmp_path, capsys):
    run_dir, _, _ = trained
    out = tmp_path / "m.ts"
    assert export.main(["--run", str(run_dir), "--out", str(out)]) == 0
    assert "equal to the eager model's" in capsys.readouterr().out
    boxes, scores, labels = torch.jit.load(str(out))(torch.full((3, 64, 64), 0.3))
    assert boxes.shape[1:] == (4,) and scores.shape == labels.shape
    assert export.main(["--run", str(Path(tmp_path / "nope")), "--out", str(out)]) == 1


def test_readme_torchscript_line_loads_the_model_and_needs_the_torchvision_import(trained, tmp_path):
    """README's loading line, run as written in a fresh interpreter; without ``import torchvision`` the
    torchvision::nms op is unknown, which is why the line has it."""
    run_dir, _, _ = trained
    model = tmp_path / "model.ts"
    assert export.main(["--run", str(run_dir), "--out", str(model)]) == 0
    line = next(x for x in (ROOT / "README.md").read_text().splitlines() if "torch.jit.load('model.ts')" in x)
    code = line.split('python -c "', 1)[1].split('"', 1)[0].replace("'model.ts'", repr(str(model)))
    setup = "import torch; image = torch.full((3, 64, 64), 0.3); "
    check = "; print('loaded', boxes.shape[1], scores.shape == labels.shape)"
    ok = subprocess.run([sys.executable, "-c", setup + code + check], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.strip().splitlines()[-1] == "loaded 4 True"
    bare = code.replace("import torch, torchvision;", "import torch;")
    assert "torchvision" not in bare.split("torch.jit.load")[0]
    fail = subprocess.run([sys.executable, "-c", setup + bare + check], capture_output=True, text=True, timeout=120)
    assert fail.returncode != 0 and "torchvision::nms" in fail.stderr
