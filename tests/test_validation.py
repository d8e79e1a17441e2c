"""Annotation checks at load time: degenerate, non-finite and out-of-image boxes, unknown categories,
bad ids, missing fields and images; errors name the file, the entry and the value."""

from __future__ import annotations

import copy
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from detlib.data.coco import CocoDetection
from detlib.data.validation import AnnotationError, validate_coco
from detlib.engine.build import build_losses, build_model


def coco(anns, images=None, cats=None, info=True) -> dict:
    d = {
        "images": images or [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}],
        "annotations": anns,
        "categories": cats or [{"id": 5, "name": "thing"}],
    }
    if info:
        d["info"] = {}
    return d


def ann(i, bbox, **kw) -> dict:
    return {"id": i, "image_id": 1, "category_id": 5, "bbox": bbox, "area": 1.0, "iscrowd": 0, **kw}


@pytest.mark.parametrize("bbox", [[10, 10, 0, 5], [10, 10, 5, -3]])
def test_degenerate_box_error_names_file_id_value(bbox):
    with pytest.raises(AnnotationError, match=r"ann\.json: annotation id 7: .*bbox.*" + str(bbox[2])):
        validate_coco(coco([ann(7, bbox)]), "ann.json")


def test_degenerate_box_skip_drops_counts_and_names(caplog):
    with caplog.at_level(logging.WARNING):
        out, counts = validate_coco(coco([ann(1, [1, 1, 5, 5]), ann(2, [10, 10, 0, 5])]), "ann.json", "skip")
    assert [a["id"] for a in out["annotations"]] == [1]
    assert counts["dropped: degenerate box"] == 1 and "id 2" in caplog.text


@pytest.mark.parametrize("bbox", [[1, 2, float("nan"), 4], [1, 2, float("inf"), 4], [1, 2, 3], "1,2,3,4",
                                  [1, 2, 3, None]])
def test_nan_inf_or_not_four_numbers_is_always_an_error(bbox):
    for mode in ("error", "skip"):
        with pytest.raises(AnnotationError, match="annotation id 3"):
            validate_coco(coco([ann(3, bbox)]), "ann.json", mode)


def test_box_partly_outside_is_clipped_entirely_outside_dropped():
    out, counts = validate_coco(coco([ann(1, [-10, 70, 30, 30]), ann(2, [200, 10, 5, 5])]), "ann.json")
    assert out["annotations"][0]["bbox"] == [0.0, 70, 20, 10]
    assert len(out["annotations"]) == 1
    assert counts["clipped: box partly outside its image"] == 1 and counts["dropped: box outside its image"] == 1


def _write_dataset(tmp_path, anns, images=None):
    images = images or [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
                        {"id": 2, "file_name": "b.png", "width": 100, "height": 80}]
    for im in images:
        Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(tmp_path / im["file_name"])
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(coco(anns, images)))
    return path


def test_image_without_annotations_gives_zero_box_loss_with_gradient(tmp_path):

    from .conftest import compose_cfg

    path = _write_dataset(tmp_path, [ann(1, [10, 10, 20, 20])])
    ds = CocoDetection(path, tmp_path, train=True)
    image, target = ds[1]  # image 2 has no annotations
    assert target["boxes"].shape == (0, 4)
    cfg = compose_cfg("model.min_size=64", "model.max_size=128")
    for loss in ("smooth_l1", "giou"):
        c = compose_cfg(f"loss={loss}")
        model = build_model(cfg, ds.num_classes, *build_losses(c))
        out = model([image], [target])
        for k in ("loss_box_reg", "loss_rpn_box_reg"):
            assert out["losses"][k].item() == 0.0 and torch.isfinite(out["losses"][k])
        sum(out["losses"].values()).backward()
        grads = [p.grad for p in model.roi_head.bbox_pred.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_unknown_category_is_an_error():
    with pytest.raises(AnnotationError, match="annotation id 4: category_id 99"):
        validate_coco(coco([ann(4, [1, 1, 5, 5], category_id=99)]), "ann.json")


def test_duplicate_or_zero_annotation_ids_are_renumbered():
    out, counts = validate_coco(coco([ann(0, [1, 1, 5, 5]), ann(3, [2, 2, 5, 5]), ann(3, [3, 3, 5, 5])]), "a.json")
    ids = [a["id"] for a in out["annotations"]]
    assert ids == [1, 2, 3] and counts["renumbered: annotation id 0 or duplicate"] == 2


def test_renumbering_gives_the_right_ap():
    """pycocotools mis-scores duplicate ids; after validation AP for perfect detections is exactly 1."""
    from detlib.data.coco import coco_from_dict
    from detlib.evaluation.coco_eval import evaluate_coco

    raw = coco([ann(1, [1, 1, 20, 20]), ann(1, [40, 40, 20, 20]), ann(0, [60, 10, 15, 15])])
    clean, _ = validate_coco(copy.deepcopy(raw), "a.json")
    res = [{"image_id": 1, "category_id": 5, "bbox": a["bbox"], "score": 1.0} for a in raw["annotations"]]
    stats, _ = evaluate_coco(coco_from_dict(clean), res)
    assert stats["AP"] == pytest.approx(1.0)


def test_missing_area_iscrowd_info_filled_with_one_warning(caplog):
    a = {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 1, 4, 5]}
    with caplog.at_level(logging.WARNING):
        out, _ = validate_coco(coco([a], info=False), "ann.json")
    assert out["annotations"][0]["area"] == 20 and out["annotations"][0]["iscrowd"] == 0 and "info" in out
    assert sum("filled standard defaults" in r.message for r in caplog.records) == 1


def test_missing_or_wrong_size_image_names_the_path(tmp_path):
    path = _write_dataset(tmp_path, [ann(1, [10, 10, 20, 20])])
    (tmp_path / "b.png").unlink()
    with pytest.raises(AnnotationError, match="b.png: file not found"):
        CocoDetection(path, tmp_path)
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(AnnotationError, match=r"b.png: size 10x10 differs"):
        CocoDetection(path, tmp_path)
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.raises(AnnotationError, match="b.png: unreadable"):
        CocoDetection(path, tmp_path)
    ds = CocoDetection(path, tmp_path, invalid="skip")
    assert ds.ids == [1]


def test_missing_annotation_file_and_image_folder_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(tmp_path / "nope.json", tmp_path)
    with pytest.raises(FileNotFoundError, match="no_images"):
        CocoDetection(tmp_path / "x.json", tmp_path / "no_images")


def test_crowd_is_never_a_training_foreground(tmp_path):
    path = _write_dataset(tmp_path, [ann(1, [10, 10, 20, 20]), ann(2, [50, 20, 30, 30], iscrowd=1)])
    ds = CocoDetection(path, tmp_path, train=True)
    _, target = ds[0]
    assert target["boxes"].tolist() == [[10.0, 10.0, 30.0, 30.0]]
    assert len(ds.coco.getAnnIds(imgIds=[1])) == 2  # evaluation still sees the crowd region


@pytest.mark.parametrize("model_name", ["small", "fast_rcnn"])
def test_batch_without_any_foreground_trains(model_name):
    """No GT in the whole batch (also without an RPN): finite losses, box losses exactly 0, gradients present."""

    from .conftest import compose_cfg

    cfg = compose_cfg(f"model={model_name}", "model.min_size=64", "model.max_size=96")
    model = build_model(cfg, 3)
    empty = [{"boxes": torch.zeros((0, 4)), "labels": torch.zeros(0, dtype=torch.int64), "image_id": i, "aug_seed": i}
             for i in (1, 2)]
    out = model([torch.rand(3, 64, 96), torch.rand(3, 96, 64)], empty)
    assert all(torch.isfinite(v) for v in out["losses"].values())
    assert out["losses"]["loss_box_reg"].item() == 0.0 and out["losses"]["loss_cls"].item() > 0
    sum(out["losses"].values()).backward()
    assert model.roi_head.bbox_pred.weight.grad is not None and model.roi_head.cls_score.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# Field types mean what COCO means: never truthiness


@pytest.mark.parametrize("value", ["0", "1", "", 2, 0.0, None])
def test_iscrowd_of_the_wrong_type_is_an_error_naming_file_id_value(tmp_path, value):
    path = _write_dataset(tmp_path, [ann(1, [10, 10, 20, 20]), ann(7, [50, 20, 30, 30], iscrowd=value)])
    with pytest.raises(AnnotationError) as e:
        CocoDetection(path, tmp_path, train=True)
    assert str(path) in str(e.value) and "annotation id 7" in str(e.value) and "'iscrowd'" in str(e.value)
    assert repr(value) in str(e.value)
    if isinstance(value, str):
        assert "crowd region" in str(e.value)  # says why a string is wrong


def test_iscrowd_true_false_are_converted_to_1_0_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        out, counts = validate_coco(coco([ann(1, [1, 1, 4, 5], iscrowd=False), ann(2, [9, 9, 4, 5], iscrowd=True)]),
                                    "ann.json")
    assert [(a["iscrowd"], type(a["iscrowd"])) for a in out["annotations"]] == [(0, int), (1, int)]
    assert counts["converted: iscrowd true/false to 1/0"] == 2


def test_duplicate_category_names_keep_both_classes_apart_by_id(tmp_path, caplog):
    from detlib.evaluation.report import category_names

    cats = [{"id": 5, "name": "car"}, {"id": 9, "name": "car"}, {"id": 11, "name": "bus"}]
    images = [{"id": 1, "file_name": "a.png", "width": 100, "height": 80}]
    Image.fromarray(np.zeros((80, 100, 3), np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "ann.json").write_text(json.dumps(coco([ann(1, [10, 10, 20, 20])], images, cats)))
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path / "ann.json", tmp_path)
    want = ["car (id 5)", "car (id 9)", "bus"]
    assert ds.class_names == want  # drawings (browse, visualize, dashboard)
    assert list(category_names(ds.coco).values()) == want  # per-class AP in logs, TensorBoard, eval_detail.json
    assert any("share the name 'car'" in r.message and "[5, 9]" in r.message for r in caplog.records)


def test_train_ann_naming_a_folder_says_folder_and_the_key_not_not_found(tmp_path):
    from detlib.config import DataConfig
    from detlib.data.build import build_datasets

    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "instances_train.json").write_text("{}")
    cfg = DataConfig(name="coco", root=str(tmp_path), train_ann="annotations", train_images=".",
                     val_ann="annotations/instances_train.json", val_images=".")
    with pytest.raises(ValueError) as e:
        build_datasets(cfg)
    msg = str(e.value)
    assert "data.train_ann=annotations is a folder" in msg and "annotations/instances_train.json" in msg
    assert "not found" not in msg
    with pytest.raises(AnnotationError, match="annotations is a folder, not a file"):  # the dataset itself too
        CocoDetection(tmp_path / "annotations", tmp_path)
