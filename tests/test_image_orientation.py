"""EXIF orientation: phones store pixels unrotated with a tag; annotation tools export width, height and
boxes in the displayed frame. detlib's one decode path applies the tag (``data.exif_orientation=apply``,
as detectron2 and mmcv do) or, for datasets annotated on the stored pixels, ignores it.

The fixtures are real JPEGs with a real EXIF block; PIL's own ``ImageOps.exif_transpose`` checks that
each one displays as intended, so the tests do not lean on detlib's transpose table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from detlib.config import DataConfig
from detlib.data.build import build_datasets
from detlib.data.coco import CocoDetection
from detlib.data.image import check_image, read_image
from detlib.data.validation import AnnotationError
from detlib.predictor import to_image_tensor

BACKGROUND = (40, 40, 40)
OBJECTS = [((230, 30, 30), [6, 8, 20, 14]), ((30, 220, 40), [34, 30, 16, 22])]  # colour, bbox xywh (displayed)


def displayed(width: int, height: int) -> np.ndarray:
    """``(H, W, 3)`` uint8: grey background, a red and a green rectangle at ``OBJECTS``' boxes."""
    img = np.full((height, width, 3), BACKGROUND, np.uint8)
    for colour, (x, y, w, h) in OBJECTS:
        img[y:y + h, x:x + w] = colour
    return img


def stored_pixels(shown: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores so that a viewer applying ``orientation`` shows ``shown`` (EXIF 2.3, 4.6.4)."""
    return {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
            5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, 1), 7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
            8: lambda a: np.rot90(a, -1)}[orientation](shown)


def write_jpeg(path: Path, shown: np.ndarray, orientation: int) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.ascontiguousarray(stored_pixels(shown, orientation))).save(path, quality=95, subsampling=0,
                                                                                 exif=exif.tobytes())
    with Image.open(path) as im:  # the fixture displays as intended, by PIL's reading of the tag
        assert np.abs(np.asarray(ImageOps.exif_transpose(im)).astype(int) - shown).mean() < 3
    return path


def write_dataset(root: Path, orientation: int, width: int, height: int, frame: str = "displayed") -> Path:
    """One rotated JPEG and its annotations: sizes and boxes in the ``displayed`` frame (as annotation tools
    export them) or in the ``stored`` pixels' frame (boxes then cover the same pixels once stored)."""
    shown = displayed(width, height)
    write_jpeg(root / "phone.jpg", shown, orientation)
    if frame == "displayed":
        size, anns = (width, height), [bbox for _, bbox in OBJECTS]
    else:  # annotate the stored pixels: find each object's box in them
        stored = stored_pixels(shown, orientation)
        size, anns = (stored.shape[1], stored.shape[0]), []
        for colour, _ in OBJECTS:
            ys, xs = np.nonzero((stored == colour).all(axis=2))
            anns.append([int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)])
    data = {"images": [{"id": 1, "file_name": "phone.jpg", "width": size[0], "height": size[1]}],
            "annotations": [{"id": k + 1, "image_id": 1, "category_id": k + 1, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for k, b in enumerate(anns)],
            "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}
    (root / "ann.json").write_text(json.dumps(data))
    return root / "ann.json"


def assert_objects_inside_boxes(image: torch.Tensor, boxes: torch.Tensor) -> None:
    """The mean colour inside each served box is its object's, not the background's."""
    for (colour, _), (x1, y1, x2, y2) in zip(OBJECTS, boxes.round().int().tolist()):
        mean = image[:, y1:y2, x1:x2].mean(dim=(1, 2)) * 255
        assert torch.allclose(mean, torch.tensor(colour, dtype=torch.float32), atol=25), (colour, mean.tolist())


SHAPES = {"square": (64, 64), "non-square": (72, 56)}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_rotated_jpeg_serves_each_object_inside_its_box(tmp_path, orientation, shape):
    width, height = SHAPES[shape]
    path = write_dataset(tmp_path, orientation, width, height)
    for train in (True, False):  # training and validation read through the same path
        ds = CocoDetection(path, tmp_path, train=train)
        image, target = ds[0]
        assert image.shape == (3, height, width)
        assert_objects_inside_boxes(image, target["boxes"])
    # predict (a path given to the Predictor) and the tools decode the same way
    assert torch.equal(to_image_tensor(tmp_path / "phone.jpg"), image)
    assert torch.equal(read_image(tmp_path / "phone.jpg"), image)
    assert check_image(tmp_path / "phone.jpg") == (width, height)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_ignore_serves_the_stored_pixels_for_data_annotated_on_them(tmp_path, orientation):
    path = write_dataset(tmp_path, orientation, 72, 56, frame="stored")
    cfg = DataConfig(name="coco", root=str(tmp_path), train_ann="ann.json", train_images=".", val_ann="ann.json",
                     val_images=".", exif_orientation="ignore", hflip_prob=0.0)
    for ds in build_datasets(cfg):  # the switch reaches both splits
        assert ds.exif_orientation == "ignore"
        image, target = ds[0]
        assert_objects_inside_boxes(image, target["boxes"])
    assert torch.equal(read_image(path.parent / "phone.jpg", "ignore"), image)


@pytest.mark.parametrize("convention,json_frame,other", [("apply", "stored", "ignore"),
                                                          ("ignore", "displayed", "apply")])
def test_size_mismatch_the_other_convention_explains_names_the_switch(tmp_path, convention, json_frame, other):
    path = write_dataset(tmp_path, 6, 72, 56, frame=json_frame)
    with pytest.raises(AnnotationError) as e:
        CocoDetection(path, tmp_path, exif_orientation=convention)
    msg = str(e.value)
    assert "phone.jpg" in msg and "EXIF orientation 6" in msg and f"set data.exif_orientation={other}" in msg
    assert "stored 56x72, displayed 72x56" in msg
