"""Build the train and val datasets named by ``data.name`` from a typed ``DataConfig``."""

from __future__ import annotations

from pathlib import Path

from detlib.config import DataConfig
from detlib.data.coco import CocoDetection
from detlib.data.synthetic import SyntheticSpec, build_synthetic


def _under(root: Path, p: str, key: str) -> Path:
    if not p:
        raise ValueError(f"config: data.{key} is empty; data=coco needs data.train_ann, data.train_images, "
                         "data.val_ann and data.val_images")
    q = Path(p).expanduser()
    return q if q.is_absolute() else root / q


def build_datasets(cfg: DataConfig) -> tuple[CocoDetection, CocoDetection]:
    """``(train, val)``: the synthetic data is generated once into ``cfg.root``; COCO is read as given."""
    root = Path(cfg.root).expanduser()
    if cfg.name == "synthetic":
        folder = build_synthetic(root, SyntheticSpec(**vars(cfg.synthetic)))
        paths = (folder / "instances_train.json", folder, folder / "instances_val.json", folder)
    elif cfg.name == "coco":
        paths = (_under(root, cfg.train_ann, "train_ann"), _under(root, cfg.train_images, "train_images"),
                 _under(root, cfg.val_ann, "val_ann"), _under(root, cfg.val_images, "val_images"))
    else:
        raise ValueError(f"config: data.name must be synthetic|coco, got {cfg.name!r}")
    train = CocoDetection(paths[0], paths[1], train=True, invalid=cfg.invalid, hflip_prob=cfg.hflip_prob,
                          keep_empty=cfg.keep_empty)
    val = CocoDetection(paths[2], paths[3], train=False, invalid=cfg.invalid)
    if train.cat_ids != val.cat_ids:
        raise ValueError(f"{paths[0]} and {paths[2]} have different categories: {train.cat_ids} vs {val.cat_ids}")
    return train, val
