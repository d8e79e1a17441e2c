"""Build the train and val datasets named by ``data.name`` from a typed ``DataConfig``."""

from __future__ import annotations

import logging
from pathlib import Path

from detlib.config import DataConfig
from detlib.data.coco import CocoDetection
from detlib.data.synthetic import SyntheticSpec, build_synthetic, damaged
from detlib.data.validation import AnnotationError
from detlib.data.voc import voc_folder, voc_to_coco

log = logging.getLogger(__name__)


def _under(root: Path, p: str, key: str) -> Path:
    if not p:
        raise ValueError(f"config: data.{key} is empty; data=coco needs data.train_ann, data.train_images, "
                         "data.val_ann and data.val_images")
    q = Path(p).expanduser()
    q = q if q.is_absolute() else root / q
    if key.endswith("_ann") and q.is_dir():  # else "not found" later, though the path exists
        found = sorted(f.name for f in q.glob("*.json"))[:3]
        raise ValueError(f"config: data.{key}={p} is a folder ({q}), not an annotation file: name the JSON file "
                         "itself" + (f", e.g. data.{key}={Path(p) / found[0]} (it holds {', '.join(found)})"
                                     if found else ""))
    return q


def _voc_datasets(cfg: DataConfig, root: Path) -> tuple[CocoDetection, CocoDetection]:
    """VOC splits converted to COCO dicts in memory; ``ann_file`` names the split file in messages."""
    folder = voc_folder(root, cfg.voc.year)
    sets = []
    for split, train in ((cfg.voc.train_split, True), (cfg.voc.val_split, False)):
        source = folder / "ImageSets" / "Main" / f"{split}.txt"
        data = voc_to_coco(folder, split, cfg.invalid)
        kw = dict(hflip_prob=cfg.hflip_prob, keep_empty=cfg.keep_empty) if train else {}
        sets.append(CocoDetection(source, folder / "JPEGImages", train=train, invalid=cfg.invalid, data=data,
                                  exif_orientation=cfg.exif_orientation, **kw))
    return sets[0], sets[1]


def annotation_files(cfg: DataConfig) -> dict[str, Path] | None:
    """``{"train": path, "val": path}``: the annotation files ``build_datasets`` reads, found without reading
    them (a finished run is recognised by their fingerprints before any data is built): the COCO files as
    named, the synthetic cache's once it is built; None where there is no such file (VOC is converted in
    memory, the synthetic data not yet generated)."""
    root = Path(cfg.root).expanduser()
    if cfg.name == "coco":
        return {"train": _under(root, cfg.train_ann, "train_ann"), "val": _under(root, cfg.val_ann, "val_ann")}
    if cfg.name == "synthetic":
        folder = root / f"synthetic-{SyntheticSpec(**vars(cfg.synthetic)).key()}"
        if (folder / "DONE").is_file():
            return {split: folder / f"instances_{split}.json" for split in ("train", "val")}
    return None


def build_datasets(cfg: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)``: the synthetic data is generated once into ``cfg.root``; COCO and VOC are read as given.

    Training-split extras: ``train.group_ids`` (aspect-ratio groups, when ``cfg.aspect_grouping``)
    and ``train.noise_stats`` (the realised annotation noise, when ``cfg.noise`` asks for any).
    """
    root = Path(cfg.root).expanduser()
    if cfg.name == "voc":
        train, val = _voc_datasets(cfg, root)
    else:
        if cfg.name == "synthetic":
            folder = build_synthetic(root, SyntheticSpec(**vars(cfg.synthetic)))
            paths = (folder / "instances_train.json", folder, folder / "instances_val.json", folder)
        elif cfg.name == "coco":
            paths = (_under(root, cfg.train_ann, "train_ann"), _under(root, cfg.train_images, "train_images"),
                     _under(root, cfg.val_ann, "val_ann"), _under(root, cfg.val_images, "val_images"))
        else:
            raise ValueError(f"config: data.name must be synthetic|coco|voc, got {cfg.name!r}")
        try:
            train = CocoDetection(paths[0], paths[1], train=True, invalid=cfg.invalid, hflip_prob=cfg.hflip_prob,
                                  keep_empty=cfg.keep_empty, exif_orientation=cfg.exif_orientation)
            val = CocoDetection(paths[2], paths[3], train=False, invalid=cfg.invalid,
                                exif_orientation=cfg.exif_orientation)
        except AnnotationError as e:
            if cfg.name != "synthetic":
                raise
            # The generated files are ours: a bad one means a damaged cache, not data to skip.
            raise damaged(paths[1], str(e).split(" (set data.invalid=skip")[0]) from e
    if train.cat_ids != val.cat_ids:
        raise ValueError(f"{train.ann_file} and {val.ann_file} have different categories: "
                         f"{train.cat_ids} vs {val.cat_ids}")
    if cfg.aspect_grouping:
        train.group_ids = train.aspect_group_ids()
        log.info("aspect-ratio grouping: %d portrait / %d landscape training images",
                 train.group_ids.count(0), train.group_ids.count(1))
    if cfg.noise.jitter > 0 or cfg.noise.outliers > 0:
        train.add_noise(cfg.noise.jitter, cfg.noise.outliers, cfg.noise.seed)  # the val split stays clean
    return train, val
