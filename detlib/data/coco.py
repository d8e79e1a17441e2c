"""COCO-format detection dataset: images on disk plus one annotation JSON.

Labels are contiguous ``1..K`` (0 is background) in the order of sorted category ids; the dataset
holds the mapping both ways so evaluation can write the file's own category ids back exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from detlib.data.coco_files import coco_from_dict, load_coco_json  # noqa: F401 - part of this module's API
from detlib.data.image import ImageDecodeError, oriented_size, probe_image, read_image
from detlib.data.validation import AnnotationError, category_labels, validate_coco_views

log = logging.getLogger(__name__)


class CocoDetection(torch.utils.data.Dataset):
    """Images and boxes of one COCO-format split.

    ``dataset[i]`` (or ``dataset[(i, aug_seed)]`` from the training sampler, which makes the
    augmentation deterministic) returns ``(image, target)``:
    ``image (3, H, W) float32 in [0, 1]``; ``target["boxes"] (N, 4) float32 xyxy absolute pixels``,
    ``target["labels"] (N,) int64 in 1..K``, ``target["image_id"] int``, ``target["hflip"] bool``
    and, from the sampler, ``target["aug_seed"] int`` (a Fast R-CNN proposal source follows the flip
    and seeds its randomness with them). Crowd regions are never training foregrounds: they are left
    out of ``boxes`` (evaluation reads them from ``coco``).

    ``coco`` is the ground truth evaluation scores: the file's boxes as given (only pycocotools'
    logged corrections, see ``detlib.data.validation``). The training boxes are a separate,
    cleaned copy (clipped to the image, boxes wholly outside dropped), so that cleaning never
    changes the val AP.
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        train: bool = False,
        invalid: str = "error",
        hflip_prob: float = 0.0,
        keep_empty: bool = True,
        check_images: bool = True,
        data: dict | None = None,
        exif_orientation: str = "apply",
    ) -> None:
        """``data``: an annotation dict already in memory (e.g. converted from Pascal VOC); ``ann_file``
        then only names its source in messages. ``exif_orientation``: ``apply`` (the JSON's sizes and
        boxes are in the displayed frame, as annotation tools export them) or ``ignore`` (in the stored
        pixels); see ``detlib.data.image``."""
        self.ann_file, self.image_root = Path(ann_file), Path(image_root)
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.image_root} (for {self.ann_file})")
        raw = load_coco_json(self.ann_file) if data is None else data
        train_data, gt_data, self.counts = validate_coco_views(raw, self.ann_file, invalid)
        self.coco = coco_from_dict(gt_data)  # what evaluation scores: the boxes as given
        self._train_anns: dict[int, list[dict]] = {}  # what training sees: cleaned boxes
        for a in train_data["annotations"]:
            self._train_anns.setdefault(a["image_id"], []).append(a)
        self.train, self.hflip_prob = train, hflip_prob
        self.cat_ids = sorted(self.coco.getCatIds())
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        labels = category_labels(list(self.coco.cats.values()))  # ids sharing a name: "name (id N)"
        self.class_names = [labels[c] for c in self.cat_ids]
        self.invalid, self.exif_orientation = invalid, str(exif_orientation)
        listed = sorted(self.coco.imgs)
        checked = self._check_images(listed, invalid) if check_images else listed
        ids = checked
        if train and not keep_empty:
            ids = [i for i in ids if self._boxes_of(i)[0].shape[0] > 0]
        if not ids:  # an empty split would only fail later (an empty val set at the final evaluation)
            detail = f"{len(listed)} listed, {len(listed) - len(checked)} skipped as bad"
            if len(checked) > len(ids):
                detail += f", {len(checked)} without boxes left out (data.keep_empty=false)"
            raise AnnotationError(f"{self.ann_file}: no usable images in this split ({detail})")
        self.ids = ids
        # Decode errors met in __getitem__ under data.invalid=skip, in this process (DataLoader workers
        # keep their own; each skip is logged with the file's name).
        self.skipped_images = 0
        self.unreadable: dict[int, str] = {}
        self._targets = {i: self._boxes_of(i) for i in ids}  # small: boxes are parsed once
        self.group_ids: list[int] | None = None  # set by build_datasets when data.aspect_grouping
        self.noise_stats: dict[str, float] = {}  # set by add_noise

    def set_label_order(self, cat_ids: list[int]) -> None:
        """Labels 1..K are ``cat_ids`` in this order (a trained model's classes, matched by name to this
        file's ids: ``detlib.engine.restore.match_classes``); targets are rebuilt with the new labels."""
        if sorted(cat_ids) != sorted(self.cat_ids):
            raise ValueError(f"{self.ann_file}: label order {cat_ids} is not a permutation of its ids {self.cat_ids}")
        self.cat_ids = list(cat_ids)
        self.cat_to_label = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.label_to_cat = {i + 1: c for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self._targets = {i: self._boxes_of(i) for i in self.ids}

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.cat_ids) + 1

    def _check_images(self, ids: list[int], invalid: str) -> list[int]:
        """A missing, unreadable, cut short, too large or wrongly sized image is an error naming it
        (or skipped). Header-level, see ``detlib.data.image.probe_image``: about one header read per image.
        The size compared is the one served under ``exif_orientation``."""
        keep, bad, tagged = [], [], []
        for i in ids:
            info = self.coco.imgs[i]
            path = self.image_root / info["file_name"]
            try:
                stored, orientation = probe_image(path)
                problem = self._size_problem(stored, orientation, (info["width"], info["height"]))
                if orientation != 1:
                    tagged.append(f"{path.name} ({orientation})")
            except FileNotFoundError:
                problem = "file not found"
            except ImageDecodeError as e:
                problem = e.reason
            except OSError as e:  # e.g. a folder where a file should be
                problem = f"unreadable ({e})"
            if problem is None:
                keep.append(i)
                continue
            msg = f"{self.ann_file}: image id {i}: {path}: {problem}"
            if invalid == "error":
                raise AnnotationError(msg + " (set data.invalid=skip to skip such images)")
            bad.append(msg)
        if bad:
            log.warning("skipped %d bad images (first: %s)", len(bad), "; ".join(bad[:5]))
        if tagged:
            log.info("%s: %d images carry an EXIF orientation tag (first: %s): %s (data.exif_orientation=%s)",
                     self.ann_file, len(tagged), ", ".join(tagged[:5]), "applied, boxes are in the displayed frame"
                     if self.exif_orientation == "apply" else "ignored, boxes are in the stored pixels",
                     self.exif_orientation)
        return keep

    def _size_problem(self, stored: tuple[int, int], orientation: int, declared: tuple) -> str | None:
        """Why the image's size under ``exif_orientation`` is not the JSON's; says so when the other
        convention would give the JSON's size."""
        sizes = {"apply": oriented_size(stored, orientation), "ignore": stored}
        size = sizes[self.exif_orientation]
        if size == declared:
            return None
        problem = f"size {size[0]}x{size[1]} differs from the JSON's {declared[0]}x{declared[1]}"
        other = "ignore" if self.exif_orientation == "apply" else "apply"
        if sizes[other] == declared:
            shown = sizes["apply"]
            frame = "stored pixels" if other == "ignore" else "displayed frame (as annotation tools export it)"
            problem += (f" under data.exif_orientation={self.exif_orientation}: the image carries EXIF orientation "
                        f"{orientation} (stored {stored[0]}x{stored[1]}, displayed {shown[0]}x{shown[1]}) and the JSON "
                        f"has the {'stored' if other == 'ignore' else 'displayed'} size: if the annotations were made "
                        f"on the {frame}, set data.exif_orientation={other}")
        return problem

    def _boxes_of(self, image_id: int) -> tuple[np.ndarray, np.ndarray]:
        anns = [a for a in self._train_anns.get(image_id, []) if not a.get("iscrowd", 0)]
        boxes = np.array([a["bbox"] for a in anns], np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # xywh -> xyxy
        labels = np.array([self.cat_to_label[a["category_id"]] for a in anns], np.int64)
        return boxes, labels

    def __len__(self) -> int:
        return len(self.ids)

    def aspect_ratios(self) -> list[float]:
        """Width / height of every image, for aspect-ratio grouping."""
        return [self.coco.imgs[i]["width"] / self.coco.imgs[i]["height"] for i in self.ids]

    def aspect_group_ids(self, bins: int = 0) -> list[int]:
        """A group id per image for ``TrainBatchSampler(group_ids=...)``, so a batch pads little.

        ``bins=0``: 0 for portrait (w < h), 1 for landscape or square. ``bins=k > 0``: torchvision's
        ``create_aspect_ratio_groups``, i.e. w/h quantised at ``2 ** linspace(-1, 1, 2k + 1)``.
        """
        edges = [1.0] if bins == 0 else (2 ** np.linspace(-1, 1, 2 * bins + 1)).tolist()
        return np.digitize(self.aspect_ratios(), edges).tolist()

    def add_noise(self, jitter: float, outliers: float, seed: int = 0) -> dict[str, float]:
        """Corrupt this split's training boxes once (see ``detlib.data.noise``); returns the realised stats."""
        from detlib.data.noise import perturb_targets

        sizes = {i: (self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) for i in self.ids}
        self._targets, self.noise_stats = perturb_targets(self._targets, sizes, jitter, outliers, seed)
        log.info("%s: annotation noise (jitter %.3g, outliers %.3g, seed %d): %s", self.ann_file, jitter,
                 outliers, seed, ", ".join(f"{k} {v:.4g}" for k, v in self.noise_stats.items()))
        return self.noise_stats

    def boxes(self, image_id: int) -> np.ndarray:
        """The training boxes of one image as served (after noise, before flip): ``(N, 4)`` float32 xyxy."""
        return self._targets[image_id][0]

    def _read(self, index: int) -> tuple[int, Tensor]:
        """``(image id, image)`` for ``index``, with what ``data.invalid`` asks for an image that fails to decode.

        ``error``: ``ImageDecodeError`` naming the annotation file, the image id and the file. ``skip``:
        a warning naming the file, ``skipped_images`` counts it, and a deterministic substitute is served:
        for training the next image (in ``ids`` order) that decodes; for evaluation a black image of the
        declared size under the same id, so its ground truth counts as missed.
        """
        n = len(self.ids)
        for step in range(n):
            image_id = self.ids[(index + step) % n]
            if image_id in self.unreadable:
                if not self.train:
                    break
                continue
            path = self.image_root / self.coco.imgs[image_id]["file_name"]
            try:
                return image_id, read_image(path, self.exif_orientation)
            except ImageDecodeError as e:
                msg = f"{self.ann_file}: image id {image_id}: {e}"
                if self.invalid == "error":
                    raise ImageDecodeError(msg + " (replace the file, or set data.invalid=skip to skip such images)",
                                           path, e.reason) from e
                self.unreadable[image_id] = e.reason
                self.skipped_images += 1
                log.warning("%s; skipped (data.invalid=skip), %s", msg, "serving the next image instead" if self.train
                            else "evaluated as a black image, its objects count as missed")
                if not self.train:
                    break
        else:
            raise ImageDecodeError(f"{self.ann_file}: none of the {n} images of this split can be decoded "
                                   f"(first: {next(iter(self.unreadable.values()))})")
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        return image_id, torch.zeros(3, int(info["height"]), int(info["width"]))

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, dict]:
        index, aug_seed = item if isinstance(item, tuple) else (item, None)
        image_id, image = self._read(index)
        boxes, labels = self._targets[image_id]
        boxes, labels = torch.from_numpy(boxes.copy()), torch.from_numpy(labels)
        flipped = False
        if self.train and self.hflip_prob > 0 and aug_seed is not None:
            g = torch.Generator().manual_seed(aug_seed)
            if torch.rand((), generator=g).item() < self.hflip_prob:
                flipped = True
                image = image.flip(-1)
                boxes = hflip_boxes(boxes, image.shape[-1])
        # hflip and aug_seed let a proposal source (Fast R-CNN mode) follow the augmentation.
        target = dict(boxes=boxes, labels=labels, image_id=image_id, hflip=flipped)
        if aug_seed is not None:
            target["aug_seed"] = aug_seed
        return image, target


def hflip_boxes(boxes: Tensor, width: int) -> Tensor:
    """``(N, 4)`` xyxy boxes of an image ``width`` pixels wide, mirrored left-right."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)


def collate(batch: list) -> tuple[list[Tensor], list[dict]]:
    """Detection batches stay lists: images may differ in size."""
    images, targets = zip(*batch)
    return list(images), list(targets)
