"""detlib.Predictor and tools/predict.py: detections on plain images equal the evaluation's on the same checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detlib
from detlib.tools import predict
from tests.conftest import ROOT


def _by_image(results: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in sorted(results, key=lambda r: -r["score"]):
        out.setdefault(r["image_id"], []).append(r)
    return out


def test_predictor_detections_equal_evaluate_on_the_same_checkpoint(trained):
    run_dir, val_ann, theirs = trained
    p = detlib.Predictor.from_run(run_dir, device="cpu")
    val = json.loads(val_ann.read_text())
    ours = []
    for img in val["images"][:8]:
        det = p(val_ann.parent / img["file_name"])
        for box, score, cat in zip(det["boxes"].tolist(), det["scores"].tolist(), det["category_ids"]):
            ours.append({"image_id": img["id"], "category_id": cat, "score": score,
                         "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
    mine, ref = _by_image(ours), _by_image([r for r in theirs if r["image_id"] in {i["id"] for i in val["images"][:8]}])
    assert sum(map(len, ref.values())) > 0 and mine.keys() == ref.keys()
    for image_id in ref:  # batch-of-1 vs batched evaluation: equal up to float rounding
        a, b = mine[image_id], ref[image_id]
        assert len(a) == len(b), image_id
        assert [r["category_id"] for r in a] == [r["category_id"] for r in b]
        np.testing.assert_allclose([r["bbox"] for r in a], [r["bbox"] for r in b], atol=1e-3)
        np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)
    assert set(det["names"]) <= {"rectangle", "ellipse", "triangle", "cross"}


def test_predictor_takes_paths_pil_numpy_and_tensors_alike(trained):
    run_dir, val_ann, _ = trained
    p = detlib.Predictor.from_run(run_dir, device="cpu")
    path = val_ann.parent / json.loads(val_ann.read_text())["images"][0]["file_name"]
    pil = Image.open(path).convert("RGB")
    arr = np.array(pil)
    ref = p(path)
    for image in (str(path), pil, arr, torch.from_numpy(arr).permute(2, 0, 1), torch.from_numpy(arr).permute(2, 0, 1) / 255):
        out = p(image)
        torch.testing.assert_close(out["boxes"], ref["boxes"])
        torch.testing.assert_close(out["scores"], ref["scores"])
    with pytest.raises(ValueError, match=r"expected an \(H, W, 3\) RGB array"):
        p(np.zeros((4, 4)))


def test_predictor_scales_integer_dtypes_by_their_range_and_refuses_floats_outside_0_1(trained):
    """The same image as uint16, int64 or float: the uint8 image's detections, or a refusal naming the range
    (a float image in [0, 255] or int64 values above 255 used to give 0 detections, silently)."""
    run_dir, val_ann, _ = trained
    p = detlib.Predictor.from_run(run_dir, device="cpu")
    arr = np.array(Image.open(val_ann.parent / json.loads(val_ann.read_text())["images"][0]["file_name"]).convert("RGB"))
    ref = p(arr)
    assert len(ref["boxes"]) > 0
    chw = torch.from_numpy(arr).permute(2, 0, 1)
    for image in (arr.astype(np.int64), arr.astype(np.uint16) * 257, chw.to(torch.int64), chw.to(torch.int32),
                  chw.to(torch.uint16) * 257, arr.astype(np.float64) / 255):
        out = p(image)
        torch.testing.assert_close(out["boxes"], ref["boxes"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(out["scores"], ref["scores"], atol=1e-5, rtol=1e-4)
    for image, needle in ((arr.astype(np.float32), r"float image values must lie in \[0, 1\], got min \d+, max 2"),
                          (chw.float(), r"must lie in \[0, 1\].*divide 8-bit values by 255"),
                          (arr.astype(np.int64) * 4, r"torch.int64 image values must lie in \[0, 255\]"),
                          (np.full_like(arr, np.nan, dtype=np.float32), r"must lie in \[0, 1\], got min nan"),
                          (arr > 0, "dtype torch.bool")):
        with pytest.raises(ValueError, match=needle):
            p(image)


def test_predict_tool_writes_coco_results_and_drawings(trained, tmp_path, capsys):
    run_dir, val_ann, _ = trained
    folder = tmp_path / "photos"
    folder.mkdir()
    for img in json.loads(val_ann.read_text())["images"][:3]:
        (folder / Path(img["file_name"]).name).write_bytes((val_ann.parent / img["file_name"]).read_bytes())
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds"
    assert predict.main(["--run", str(run_dir), "--images", str(folder), "--out", str(out), "--device", "cpu",
                         "--score-thresh", "0.0"]) == 0
    results, index = json.loads((out / "detections.json").read_text()), json.loads((out / "images.json").read_text())
    assert [i["id"] for i in index] == [1, 2, 3] and all(Path(i["file_name"]).parent == folder for i in index)
    assert results and {r["image_id"] for r in results} <= {1, 2, 3}
    assert all(set(r) == {"image_id", "category_id", "score", "bbox"} for r in results)
    assert len(list(out.glob("*.png"))) == 3
    assert "3 images" in capsys.readouterr().out
    assert predict.main(["--run", str(run_dir), "--images", str(tmp_path / "none*.jpg"), "--out", str(out)]) == 1
    assert "no image files found" in capsys.readouterr().err


def _photos(val_ann: Path, folder: Path, names: list[str]) -> list[Path]:
    """Real val images copied under ``names`` (cycling through the first few)."""
    folder.mkdir(parents=True, exist_ok=True)
    images = json.loads(val_ann.read_text())["images"][:4]
    out = []
    for i, name in enumerate(names):
        src = Image.open(val_ann.parent / images[i % len(images)]["file_name"]).convert("RGB")
        src.save(folder / name)
        out.append(folder / name)
    return out


def test_predict_tool_skips_and_counts_undecodable_files_with_an_image_suffix(trained, tmp_path, capsys):
    run_dir, val_ann, _ = trained
    folder = tmp_path / "photos"
    _photos(val_ann, folder, ["a.png", "c.png", "d.png"])
    (folder / "b.jpg").write_text("not a JPEG at all")  # sorted between the good ones
    out = tmp_path / "preds"
    assert predict.main(["--run", str(run_dir), "--images", str(folder), "--out", str(out), "--device", "cpu",
                         "--score-thresh", "0.0"]) == 0
    index = json.loads((out / "images.json").read_text())
    assert [Path(i["file_name"]).name for i in index] == ["a.png", "c.png", "d.png"]
    assert {r["image_id"] for r in json.loads((out / "detections.json").read_text())} <= {i["id"] for i in index}
    skipped = json.loads((out / "skipped.json").read_text())
    assert [Path(s["file_name"]).name for s in skipped] == ["b.jpg"] and skipped[0]["reason"]
    captured = capsys.readouterr()
    assert "1 undecodable files skipped" in captured.out and "b.jpg" in captured.err


def test_predict_tool_drawings_never_collide_nor_overwrite_an_input(trained, tmp_path, capsys):
    run_dir, val_ann, _ = trained
    folder = tmp_path / "photos"
    inputs = _photos(val_ann, folder, ["img0.jpg", "img0.png"])  # one stem, two different images
    out = tmp_path / "preds"
    assert predict.main(["--run", str(run_dir), "--images", str(folder), "--out", str(out), "--device", "cpu"]) == 0
    drawings = sorted(p.name for p in out.glob("*.png"))
    assert drawings == ["img0.jpg.png", "img0.png.png"]
    assert [i["drawing"] for i in json.loads((out / "images.json").read_text())] == ["img0.jpg.png", "img0.png.png"]
    assert not np.array_equal(np.array(Image.open(out / drawings[0])), np.array(Image.open(out / drawings[1])))
    before = {p: p.read_bytes() for p in inputs}
    for target in (folder, tmp_path):  # the input folder itself, and a folder that holds it
        assert predict.main(["--run", str(run_dir), "--images", str(folder), "--out", str(target),
                             "--device", "cpu"]) == 1
        assert "holds 2 of the input images" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in inputs} == before and sorted(p.name for p in folder.iterdir()) == [
        "img0.jpg", "img0.png"]
    other = tmp_path / "other"  # a glob over two folders with one file name: numbered, not overwritten
    _photos(val_ann, other, ["img0.png"])
    out2 = tmp_path / "preds2"
    assert predict.main(["--run", str(run_dir), "--images", str(tmp_path / "*" / "img0.png"), "--out", str(out2),
                         "--device", "cpu"]) == 0
    assert sorted(p.name for p in out2.glob("*.png")) == ["img0.png-2.png", "img0.png.png"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGKILL])
def test_predict_tool_keeps_the_detections_of_an_interrupted_run(trained, tmp_path, signum):
    run_dir, val_ann, _ = trained
    folder = tmp_path / "photos"
    _photos(val_ann, folder, [f"{i:03d}.png" for i in range(300)])
    out = tmp_path / "preds"
    proc = subprocess.Popen([sys.executable, str(ROOT / "tools" / "predict.py"), "--run", str(run_dir), "--images",
                             str(folder), "--out", str(out), "--device", "cpu", "--score-thresh", "0.0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    progress, deadline = out / "detections.jsonl", time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.is_file() and progress.read_text().count("\n") >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signum)
    proc.communicate(timeout=60)
    assert proc.returncode != 0  # stopped part way, not finished
    lines = [json.loads(x) for x in progress.read_text().splitlines()]
    assert 3 <= len(lines) < 300 and sum(len(x["detections"]) for x in lines) > 0
    assert all((out / x["image"]["drawing"]).is_file() for x in lines)
    if signum == signal.SIGINT:  # the handler ran: the COCO files hold every image processed
        dets = json.loads((out / "detections.json").read_text())
        ids = {i["id"] for i in json.loads((out / "images.json").read_text())}
        assert {x["image"]["id"] for x in lines} <= ids and all(d in dets for x in lines for d in x["detections"])
