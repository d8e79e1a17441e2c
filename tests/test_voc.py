"""Pascal VOC: XML layout -> COCO format, difficult objects, errors naming file and field, VOC07 AP50, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from detlib.data.build import build_datasets
from detlib.data.coco import coco_from_dict
from detlib.data.validation import AnnotationError
from detlib.data.voc import VOC_CLASSES, parse_voc_xml, voc_folder, voc_to_coco
from detlib.engine.build import build_model
from detlib.evaluation.inference import predict
from detlib.evaluation.voc_eval import ap_from_pr, voc07_ap50

from .conftest import compose_cfg, run_train
from .fixtures import voc_xml, write_voc


@pytest.fixture(scope="module")
def devkit(tmp_path_factory):
    root = tmp_path_factory.mktemp("VOCdevkit")
    write_voc(root)
    return root


def test_twenty_classes_in_voc_order():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"


def test_conversion_boxes_ids_and_difficult(devkit):
    folder = voc_folder(devkit, "2007")
    assert voc_folder(folder, "2012") == folder  # root may be the year folder itself
    data = voc_to_coco(folder, "trainval")
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASSES)
    assert [im["id"] for im in data["images"]] == list(range(1, 9))  # "000001" -> 1
    xml = (folder / "Annotations" / "000003.xml").read_text()
    first = xml.split("<bndbox>")[1]
    xmin, ymin, xmax, ymax = (float(first.split(f"<{f}>")[1].split("<")[0]) for f in ("xmin", "ymin", "xmax", "ymax"))
    ann = next(a for a in data["annotations"] if a["image_id"] == 3)
    assert ann["bbox"] == [xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]  # 1-based inclusive -> xywh
    difficult = [a for a in data["annotations"] if a["difficult"]]
    assert difficult and all(a["iscrowd"] == 1 for a in difficult)
    assert {a["image_id"] for a in difficult} == {3, 6}


def test_dataset_difficult_never_a_training_foreground_but_kept_for_eval(devkit):
    cfg = OmegaConf.to_object(compose_cfg("data=voc", f"data.root={devkit}"))
    train, val = build_datasets(cfg.data)
    assert len(train) == 8 and len(val) == 4 and train.num_classes == 21
    assert train.class_names == list(VOC_CLASSES)
    image_id = 3
    n_all = len(train.coco.getAnnIds(imgIds=[image_id]))
    _, target = train[train.ids.index(image_id)]
    assert target["boxes"].shape[0] == n_all - 1  # the difficult one is left out
    assert train.group_ids is not None and set(train.group_ids) == {0, 1}  # voc.yaml groups by aspect ratio


def _write(tmp_path, text: str, name: str = "000001"):
    path = tmp_path / f"{name}.xml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text,needle", [
    ("<annotation><size><width>10", "not valid XML"),
    ("<annotation><filename>a.jpg</filename></annotation>", "field 'size' is missing"),
    ("<annotation><size><width>x</width><height>5</height></size></annotation>", "'width' is not a finite number: 'x'"),
    (voc_xml("a", 50, 40, [("zebra", [1, 1, 10, 10], 0)]), "object 0: field 'name' is not a VOC class: 'zebra'"),
    (voc_xml("a", 50, 40, [("cat", [1, 1, 10, 10], 0), ("dog", [1, "nan", 10, 10], 0)]),
     "object 1: bndbox: field 'ymin' is not a finite number: 'nan'"),
    (voc_xml("a", 50, 40, [("cat", [20, 1, 10, 10], 0)]), "object 0: bndbox has xmax < xmin"),
    (voc_xml("a", 50, 40, [("cat", [1, 1, 10, 10], 2)]), "object 0: field 'difficult' must be 0 or 1, got '2'"),
    (voc_xml("a", 50, 40, [("cat", [1, 1, 10, 10], 0)]).replace("<bndbox>", "<box>").replace("</bndbox>", "</box>"),
     "object 0: field 'bndbox' is missing"),
])
def test_bad_xml_is_an_error_naming_file_and_field(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(AnnotationError) as e:
        parse_voc_xml(path)
    assert str(path) in str(e.value) and needle in str(e.value)


def test_reversed_box_with_skip_is_dropped_and_counted(tmp_path):
    folder = tmp_path / "VOC2007"
    write_voc(tmp_path, num_trainval=2, num_test=2)
    (folder / "Annotations" / "000001.xml").write_text(
        voc_xml("000001", 64, 96, [("cat", [20, 1, 10, 10], 0), ("dog", [2, 2, 30, 30], 0)]))
    with pytest.raises(AnnotationError, match="000001.xml: object 0: bndbox has xmax < xmin"):
        build_datasets(OmegaConf.to_object(compose_cfg("data=voc", f"data.root={tmp_path}")).data)
    train, _ = build_datasets(OmegaConf.to_object(compose_cfg("data=voc", f"data.root={tmp_path}",
                                                              "data.invalid=skip")).data)
    assert train.counts["dropped: degenerate box"] == 1
    assert train[0][1]["boxes"].tolist() == [[1.0, 1.0, 30.0, 30.0]]


def test_missing_folder_split_and_annotation_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Annotations/ folder"):
        voc_folder(tmp_path, "2007")
    folder = write_voc(tmp_path, num_trainval=2, num_test=1)
    with pytest.raises(FileNotFoundError, match="ImageSets/Main/val.txt"):
        voc_to_coco(folder, "val")
    (folder / "Annotations" / "000002.xml").unlink()
    with pytest.raises(AnnotationError, match="000002.xml"):
        voc_to_coco(folder, "trainval")
    folder = write_voc(tmp_path / "b", num_trainval=2, num_test=1)
    (folder / "JPEGImages" / "000003.jpg").unlink()
    with pytest.raises(AnnotationError, match="000003.jpg: file not found"):  # through CocoDetection
        build_datasets(OmegaConf.to_object(compose_cfg("data=voc", f"data.root={tmp_path / 'b'}")).data)


# ---- VOC07 11-point AP50, against a hand-computed example

def _gt() -> dict:
    def a(i, image_id, cat, box, difficult=0):
        x1, y1, x2, y2 = box
        return {"id": i, "image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1],
                "area": (x2 - x1) * (y2 - y1), "iscrowd": difficult, "difficult": difficult}

    return {
        "images": [{"id": 1, "file_name": "1.jpg", "width": 100, "height": 100},
                   {"id": 2, "file_name": "2.jpg", "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "bird"}],
        "annotations": [a(1, 1, 1, [0, 0, 10, 10]), a(2, 1, 1, [20, 20, 30, 30], difficult=1),
                        a(3, 2, 1, [0, 0, 10, 10]), a(4, 2, 2, [40, 40, 60, 60])],
    }


def _det(image_id, cat, box, score):
    x1, y1, x2, y2 = box
    return {"image_id": image_id, "category_id": cat, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}


def test_voc07_ap50_hand_computed():
    """cat, by score: TP (img 1), on the difficult box (ignored), duplicate (FP), miss (FP), TP (img 2).
    npos = 2; recall [.5 .5 .5 .5 1], precision [1 1 .5 1/3 .5]:
    recall >= 0, .1, ..., .5 -> precision 1 (6 points); .6 ... 1 -> .5 (5 points): AP = 8.5 / 11.
    dog has one object and no detection: AP 0. bird has no objects: None, left out of the mean.
    """
    results = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(1, 1, [20, 20, 30, 30], 0.8), _det(1, 1, [0, 0, 10, 10], 0.7),
               _det(2, 1, [50, 50, 60, 60], 0.6), _det(2, 1, [0, 0, 10, 10], 0.5), _det(1, 3, [0, 0, 5, 5], 0.9)]
    out = voc07_ap50(results, coco_from_dict(_gt()))
    assert out["per_class"]["cat"] == pytest.approx(8.5 / 11)
    assert out["per_class"]["dog"] == 0.0 and out["per_class"]["bird"] is None
    assert out["mAP"] == pytest.approx(8.5 / 22)
    area = voc07_ap50(results, coco_from_dict(_gt()), metric="area")
    assert area["per_class"]["cat"] == pytest.approx(0.5 * 1 + 0.5 * 0.5)


def test_voc07_iou_exactly_half_is_a_miss_and_perfect_is_one():
    gt = coco_from_dict(_gt())
    half = [_det(1, 1, [0, 0, 10, 20], 0.9), _det(2, 1, [0, 0, 10, 10], 0.8)]  # IoU 100/200 = 0.5, not > 0.5
    assert voc07_ap50(half, gt)["per_class"]["cat"] == pytest.approx(6 * 0.5 / 11)  # recall .5 at precision .5
    perfect = [_det(1, 1, [0, 0, 10, 10], 0.9), _det(2, 1, [0, 0, 10, 10], 0.9), _det(2, 2, [40, 40, 60, 60], 0.9)]
    assert voc07_ap50(perfect, gt)["mAP"] == pytest.approx(1.0)
    assert voc07_ap50([], gt)["mAP"] == 0.0


def test_ap_from_pr_rejects_unknown_metric():
    import numpy as np

    with pytest.raises(ValueError, match="11point"):
        ap_from_pr(np.ones(1), np.ones(1), "101point")


def test_voc_trains_and_evaluates_end_to_end_through_train_py(devkit, tmp_path):
    """As a user runs it: data=voc, a few iterations, COCO-style eval on converted GT; then VOC07 AP50."""
    proc = run_train("data=voc", f"data.root={devkit}", f"hydra.run.dir={tmp_path}", "trainer.max_iters=3",
                     "trainer.warmup_iters=1", "trainer.log_period=1", "trainer.device=cpu", "data.num_workers=0",
                     "model.min_size=64", "model.max_size=96", "trainer.progress=false", timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert set(metrics) >= {"AP", "AP50"} and all(v is None or 0 <= v <= 1 for v in metrics.values())
    detail = json.loads((tmp_path / "eval_detail.json").read_text())
    assert set(detail["per_class_ap"]) == set(VOC_CLASSES)
    # The VOC07 AP50 of the trained checkpoint on the converted test split.
    cfg = compose_cfg("data=voc", f"data.root={devkit}", "model.min_size=64", "model.max_size=96")
    _, val = build_datasets(OmegaConf.to_object(cfg).data)
    model = build_model(cfg, val.num_classes)
    model.load_state_dict(torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)["model"])
    results, _ = predict(model, val, torch.device("cpu"), batch_size=4)
    voc = voc07_ap50(results, val.coco)
    assert {k for k, v in voc["per_class"].items() if v is not None} == {"cat", "dog"}  # the classes with objects
    assert 0 <= voc["mAP"] <= 1
    assert detail["voc07_ap50"]["mAP"] == pytest.approx(voc["mAP"])  # the trainer logs the same number
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    assert ea.Scalars("val/VOC07_AP50")[-1].value == pytest.approx(voc["mAP"])
    # tools/evaluate.py scores the same metrics into the same file as training (eval.metrics, not the dataset).
    import contextlib
    import io

    from detlib.tools import evaluate

    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert evaluate.main(["--run", str(tmp_path), "--device", "cpu"]) == 0
    tool = json.loads((tmp_path / "eval" / "eval_detail.json").read_text())
    assert set(tool) == set(detail) and tool["voc07_ap50"] == detail["voc07_ap50"]
    assert f"val/VOC07_AP50: {voc['mAP']:.4f}" in printed.getvalue()


def test_image_ids_are_voc_ids_when_unique_else_split_order():
    from detlib.data.voc import _image_ids

    assert _image_ids(["000005", "2008_000008"]) == [5, 2008000008]
    assert _image_ids(["000000", "000001"]) == [1, 2]  # id 0 is not allowed
    assert _image_ids(["1_2", "12"]) == [1, 2]  # "1_2" and "12" would collide
    assert _image_ids(["a", "b"]) == [1, 2]


def test_the_voc07_metric_comes_from_the_evaluation_settings():
    """data=voc asks for it in eval.metrics; other data can too; an unknown name fails naming the known ones."""
    from detlib.evaluation.evaluators import extra_metrics

    assert OmegaConf.to_object(compose_cfg("data=voc")).eval.metrics == ["voc07"]
    assert OmegaConf.to_object(compose_cfg()).eval.metrics == []
    assert [m.key for m in extra_metrics(compose_cfg("eval.metrics=[voc07]").eval.metrics)] == ["voc07_ap50"]
    with pytest.raises(ValueError, match=r"eval\.metrics: no metric 'voc7' \(known: voc07\)"):
        extra_metrics(["voc7"])
