"""detlib.Predictor and tools/predict.py: detections on plain images equal the evaluation's on the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detlib
from detlib.tools import predict


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

