"""Bad image files and malformed annotation files: refused at start naming the file, or skipped and counted.

Every bad file is generated here with PIL (or written byte by byte); all components are real.
"""

from __future__ import annotations

import io
import json
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detlib.data.coco import CocoDetection, collate
from detlib.data.image import MAX_PIXELS_ENV, ImageDecodeError, check_image, read_image
from detlib.data.sampler import TrainBatchSampler
from detlib.data.validation import AnnotationError, validate_coco

RNG = np.random.default_rng(0)
W, H = 40, 30


def pixels(w: int = W, h: int = H) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_dataset(folder: Path, files: dict[str, Image.Image | bytes | None], sizes: dict[str, tuple] | None = None,
                  name: str = "ann.json") -> Path:
    """Images (a PIL image is saved by its suffix, bytes are written as they are, ``None``: already there)
    and a COCO file with one box per image."""
    images, anns = [], []
    for k, (file_name, content) in enumerate(files.items(), start=1):
        if isinstance(content, Image.Image):
            content.save(folder / file_name)
        elif content is not None:
            (folder / file_name).write_bytes(content)
        w, h = (sizes or {}).get(file_name, (W, H))
        images.append({"id": k, "file_name": file_name, "width": w, "height": h})
        anns.append({"id": k, "image_id": k, "category_id": 1, "bbox": [2, 2, 10, 8], "area": 80, "iscrowd": 0})
    path = folder / name
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "thing"}]}))
    return path


def good(n: int = 2) -> dict[str, Image.Image]:
    return {f"ok{k}.png": Image.fromarray(pixels()) for k in range(n)}


def png_bytes(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of any size, cheaply (its rows of zeros compress to almost nothing)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row = b"\x00" * (1 + (width + 7) // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def cut(image: Image.Image, fmt: str, **kw) -> bytes:
    """The file of ``image`` in ``fmt``, cut to two thirds of its length (a half-copied file)."""
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    data = buf.getvalue()
    return data[: len(data) * 2 // 3]


# ---- decoding: one function, every mode and bit depth to RGB float in [0, 1]


@pytest.mark.parametrize("mode, suffix", [("1", "png"), ("L", "png"), ("LA", "png"), ("P", "png"), ("RGB", "jpg"),
                                          ("RGBA", "png"), ("CMYK", "jpg"), ("I;16", "png"), ("I", "tif"),
                                          ("F", "tif"), ("RGB", "bmp"), ("RGB", "tif"), ("RGB", "webp")])
def test_every_pil_mode_and_format_decodes_to_rgb_float_in_unit_range(tmp_path, mode, suffix):
    if mode == "I;16":
        image = Image.fromarray(RNG.integers(0, 65536, (H, W)).astype(np.uint16))
    elif mode == "I":
        image = Image.fromarray(RNG.integers(0, 65536, (H, W)).astype(np.int32))
    elif mode == "F":
        image = Image.fromarray(RNG.random((H, W)).astype(np.float32))
    else:
        image = Image.fromarray(pixels()).convert(mode)
    path = write_dataset(tmp_path, {f"a.{suffix}": image})
    out, _ = CocoDetection(path, tmp_path)[0]
    assert out.shape == (3, H, W) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1 and out.max() > 0.5


def test_16bit_png_trains_with_pixels_in_unit_range_scaled_by_65535(tmp_path):
    grey = np.array([[0, 257, 32768, 65535]], np.uint16).repeat(3, 0)
    path = write_dataset(tmp_path, {"deep.png": Image.fromarray(grey)}, sizes={"deep.png": (4, 3)})
    with Image.open(tmp_path / "deep.png") as im:
        assert im.mode == "I;16"
    out, _ = CocoDetection(path, tmp_path)[0]
    expected = torch.tensor([0, 257, 32768, 65535], dtype=torch.float32) / 65535
    assert torch.equal(out[:, 0], expected.expand(3, 4))


def test_8bit_images_decode_exactly_as_uint8_over_255(tmp_path):
    rgb = pixels()
    Image.fromarray(rgb).save(tmp_path / "a.png")
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    assert torch.equal(read_image(tmp_path / "a.png"), expected)


def test_animated_gif_is_read_as_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (W, H), (255, 0, 0)), Image.new("RGB", (W, H), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    path = write_dataset(tmp_path, {"anim.gif": None})
    out, _ = CocoDetection(path, tmp_path, train=True)[0]
    assert out.shape == (3, H, W)
    assert torch.equal(out[:, 0, 0], torch.tensor([1.0, 0.0, 0.0]))


# ---- the start check: what would fail later fails now, naming the file


@pytest.mark.parametrize("fmt, suffix", [("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp"),
                                         ("TIFF", "tif"), ("WEBP", "webp")])
def test_truncated_image_is_refused_at_start_naming_the_file(tmp_path, fmt, suffix):
    files = {**good(), f"cut.{suffix}": cut(Image.fromarray(pixels()), fmt)}
    path = write_dataset(tmp_path, files)
    with pytest.raises(AnnotationError, match=rf"ann\.json: image id 3: .*cut\.{suffix}: unreadable"):
        CocoDetection(path, tmp_path)
    ds = CocoDetection(path, tmp_path, invalid="skip")
    assert ds.ids == [1, 2]


def test_jpeg_with_data_after_its_end_marker_is_accepted(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(pixels()).save(buf, "JPEG")
    path = write_dataset(tmp_path, {"tail.jpg": buf.getvalue() + b"\x00" * 100})
    assert CocoDetection(path, tmp_path)[0][0].shape == (3, H, W)


def test_format_pil_opens_but_cannot_decode_is_refused_at_start(tmp_path):
    """An EPS opens (its header gives the size) but needs Ghostscript to decode, which is not installed here."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 30\nshowpage\n"
    (tmp_path / "probe.eps").write_bytes(eps)
    try:
        read_image(tmp_path / "probe.eps")
        pytest.skip("this machine can decode EPS (Ghostscript is installed)")
    except ImageDecodeError:
        pass
    path = write_dataset(tmp_path, {**good(), "figure.eps": eps})
    with pytest.raises(AnnotationError, match=r"figure\.eps: unreadable \(EPS codec"):
        CocoDetection(path, tmp_path)


def test_decompression_bomb_is_refused_at_start_with_its_size_and_how_to_allow_it(tmp_path, monkeypatch):
    monkeypatch.delenv(MAX_PIXELS_ENV, raising=False)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after the test
    files = {**good(), "huge.png": png_bytes(20000, 20000), "big.png": png_bytes(10000, 10000)}
    sizes = {"huge.png": (20000, 20000), "big.png": (10000, 10000)}
    path = write_dataset(tmp_path, files, sizes)
    with pytest.raises(AnnotationError, match=rf"image id 3: .*huge\.png: too large: .*{MAX_PIXELS_ENV}"):
        CocoDetection(path, tmp_path)
    # 10000 x 10000 is above PIL's limit but below twice it, where PIL only warns: still refused
    path = write_dataset(tmp_path, {**good(), "big.png": None}, sizes)
    with pytest.raises(AnnotationError, match=rf"big\.png: too large: 10000x10000 = 100000000 pixels.*{MAX_PIXELS_ENV}"):
        CocoDetection(path, tmp_path)
    monkeypatch.setenv(MAX_PIXELS_ENV, "0")  # intended: no limit
    assert CocoDetection(path, tmp_path).ids == [1, 2, 3]


def test_malformed_png_header_is_refused_at_start(tmp_path):
    data = bytearray(png_bytes(W, H))
    data[16:24] = b"\xff" * 8  # width and height
    path = write_dataset(tmp_path, {**good(), "bad.png": bytes(data)})
    with pytest.raises(AnnotationError, match=r"bad\.png"):
        CocoDetection(path, tmp_path)


# ---- a decode error met during training: named; skipped and counted, or the run stops


def damaged_idat_png(path: Path) -> None:
    """A PNG whose header and end chunk are intact but whose pixel data is broken: passes a header check."""
    Image.fromarray(pixels()).save(path)
    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") + 8
    data[start + 50 : start + 80] = b"\x00" * 30
    path.write_bytes(bytes(data))


def test_decode_error_in_training_names_the_file_under_error(tmp_path):
    damaged_idat_png(tmp_path / "broken.png")
    path = write_dataset(tmp_path, {**good(), "broken.png": None})
    assert check_image(tmp_path / "broken.png") == (W, H)  # the cheap start check cannot see it
    ds = CocoDetection(path, tmp_path, train=True)
    with pytest.raises(ImageDecodeError, match=r"ann\.json: image id 3: .*broken\.png: cannot decode") as e:
        ds[(2, 11)]
    assert e.value.path == str(tmp_path / "broken.png") and isinstance(e.value, AnnotationError)


def test_decode_error_keeps_its_type_through_a_dataloader_worker(tmp_path):
    damaged_idat_png(tmp_path / "broken.png")
    path = write_dataset(tmp_path, {**good(), "broken.png": None})
    loader = DataLoader(CocoDetection(path, tmp_path, train=True), batch_size=3, collate_fn=collate, num_workers=1)
    with pytest.raises(ImageDecodeError, match=r"broken\.png"):
        next(iter(loader))


def test_decode_error_in_training_under_skip_serves_the_next_image_counts_and_logs(tmp_path, caplog):
    damaged_idat_png(tmp_path / "broken.png")
    path = write_dataset(tmp_path, {"ok0.png": Image.fromarray(pixels()), "broken.png": None,
                                    "ok1.png": Image.fromarray(pixels())})
    ds = CocoDetection(path, tmp_path, train=True, invalid="skip")
    with caplog.at_level(logging.WARNING):
        image, target = ds[(1, 5)]
    assert target["image_id"] == 3 and target["aug_seed"] == 5  # the next image, deterministically
    assert torch.equal(image, ds[2][0])
    assert ds.skipped_images == 1 and "broken.png" in caplog.text and "skipped" in caplog.text
    assert ds[(1, 5)][1]["image_id"] == 3 and ds.skipped_images == 1  # counted once
    batches = list(DataLoader(ds, batch_size=3, collate_fn=collate))  # training goes on
    assert [t["image_id"] for t in batches[0][1]] == [1, 3, 3]


def test_decode_error_in_evaluation_under_skip_gives_a_black_image_with_the_same_id(tmp_path):
    damaged_idat_png(tmp_path / "broken.png")
    path = write_dataset(tmp_path, {**good(), "broken.png": None})
    ds = CocoDetection(path, tmp_path, train=False, invalid="skip")
    image, target = ds[2]
    assert target["image_id"] == 3 and image.shape == (3, H, W) and image.abs().sum() == 0
    assert ds.skipped_images == 1


# ---- malformed annotation files: errors naming the file, the entry, the field and the value


def coco(**over) -> dict:
    d = {"info": {}, "images": [{"id": 1, "file_name": "a.png", "width": W, "height": H}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}],
         "categories": [{"id": 5, "name": "thing"}]}
    d.update(over)
    return d


@pytest.mark.parametrize("data, message", [
    ([{"images": []}], r"the top level must be a JSON object .* got a list"),
    (coco(categories=[]), r"field 'categories' is empty"),
    (coco(categories=[{"name": "thing"}]), r"categories\[0\]: field 'id' must be an integer, got None"),
    (coco(categories=[{"id": "5", "name": "thing"}]), r"categories\[0\]: field 'id' must be an integer, got '5'"),
    (coco(categories=[{"id": 5}]), r"category id 5: field 'name' must be a string"),
    (coco(categories=["thing"]), r"categories\[0\] must be a JSON object, got 'thing'"),
    (coco(images=[{"id": "a", "file_name": "a.png", "width": W, "height": H}]),
     r"images\[0\]: field 'id' must be an integer, got 'a'"),
    (coco(images=[{"id": 1, "file_name": "a.png", "width": "40", "height": H}]),
     r"image id 1: field 'width' must be a positive number, got '40'"),
    (coco(images=[{"id": 1, "width": W, "height": H}]), r"image id 1: field 'file_name' must be a non-empty string"),
    (coco(annotations=[[1, 1, 5, 5]]), r"annotations\[0\] must be a JSON object"),
    (coco(annotations=[{"id": 9, "category_id": 5, "bbox": [1, 1, 5, 5]}]),
     r"annotation id 9 \(annotations\[0\]\): field 'image_id' must be an integer, got None"),
    (coco(annotations=[{"id": 9, "image_id": [1], "category_id": 5, "bbox": [1, 1, 5, 5]}]),
     r"annotation id 9 \(annotations\[0\]\): field 'image_id' must be an integer, got \[1\]"),
])
def test_malformed_annotation_structure_is_a_start_error_naming_file_field_and_value(data, message):
    with pytest.raises(AnnotationError, match=r"^my_ann\.json: " + message):
        validate_coco(data, "my_ann.json")


def test_string_image_ids_are_refused_when_the_dataset_is_built(tmp_path):
    Image.fromarray(pixels()).save(tmp_path / "a.png")
    data = coco(images=[{"id": "img_a", "file_name": "a.png", "width": W, "height": H}],
                annotations=[{"id": 1, "image_id": "img_a", "category_id": 5, "bbox": [1, 1, 5, 5]}])
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with pytest.raises(AnnotationError, match=r"ann\.json: images\[0\]: field 'id' must be an integer, got 'img_a'"):
        CocoDetection(tmp_path / "ann.json", tmp_path)


def test_top_level_list_file_is_an_error_naming_it(tmp_path):
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(AnnotationError, match=r"list\.json: the top level must be a JSON object"):
        CocoDetection(tmp_path / "list.json", tmp_path)


def test_empty_split_is_refused_at_start(tmp_path):
    (tmp_path / "val.json").write_text(json.dumps(coco(images=[], annotations=[])))
    with pytest.raises(AnnotationError, match=r"val\.json: no usable images in this split \(0 listed"):
        CocoDetection(tmp_path / "val.json", tmp_path)
    path = write_dataset(tmp_path, {"cut.png": cut(Image.fromarray(pixels()), "PNG")}, name="all_bad.json")
    with pytest.raises(AnnotationError, match=r"all_bad\.json: no usable images in this split \(1 listed, 1 skipped"):
        CocoDetection(path, tmp_path, invalid="skip")


# ---- aspect-ratio groups smaller than a batch: no crash, no starved group, deterministic


def epoch(sampler: TrainBatchSampler, e: int = 0) -> list[list[int]]:
    per = sampler.batches_per_epoch()
    return [[i for i, _ in sampler.batch(e * per + k)] for k in range(per)]


def test_groups_all_smaller_than_a_batch_train_instead_of_dividing_by_zero(caplog):
    with caplog.at_level(logging.WARNING):
        sampler = TrainBatchSampler(6, 4, seed=0, max_iters=5, group_ids=[0, 0, 0, 1, 1, 1])
    assert sampler.batches_per_epoch() == 1
    assert len(list(sampler)) == 5
    assert "smaller than one global batch" in caplog.text


def test_group_smaller_than_a_batch_is_sampled_every_epoch(caplog):
    group_ids = [0] * 3 + [1] * 9  # three portrait images, batch 4
    with caplog.at_level(logging.WARNING):
        sampler = TrainBatchSampler(12, 4, seed=1, group_ids=group_ids)
    assert "group 0 (3 images) smaller than one global batch of 4" in caplog.text
    for e in range(3):
        assert sorted(i for b in epoch(sampler, e) for i in b) == list(range(12))


def test_partial_group_batches_are_filled_from_their_own_group_as_torchvision_does():
    group_ids = [0, 1] * 6  # two groups of 6, batch 4: one full batch each, then one filled partial batch
    sampler = TrainBatchSampler(12, 4, seed=0, group_ids=group_ids)
    assert sampler.batches_per_epoch() == 3  # as many as without grouping
    for e in range(4):
        batches = epoch(sampler, e)
        assert len(batches) == 3 and all(len({group_ids[i] for i in b}) == 1 for b in batches)
    # under DDP each rank takes its slice of the same one-group global batch
    ranks = [TrainBatchSampler(12, 2, seed=0, rank=r, world_size=2, group_ids=group_ids) for r in (0, 1)]
    for it in range(6):
        both = [i for s in ranks for i, _ in s.batch(it)]
        assert len({group_ids[i] for i in both}) == 1


def test_grouped_batches_are_a_function_of_seed_and_iteration_for_exact_resume():
    group_ids = [0] * 3 + [1] * 10 + [2] * 7
    full = TrainBatchSampler(20, 4, seed=3, max_iters=14, group_ids=group_ids)
    batches = list(full)
    resumed = TrainBatchSampler(20, 4, seed=3, start_iter=9, max_iters=14, group_ids=group_ids)
    assert list(resumed) == batches[9:]
    assert list(TrainBatchSampler(20, 4, seed=3, max_iters=14, group_ids=group_ids)) == batches
    assert list(TrainBatchSampler(20, 4, seed=4, max_iters=14, group_ids=group_ids)) != batches
