"""Draw ground truth (green) and predictions (red, with class and score) on images, one PNG each.

    uv run tools/visualize.py --run RUN_DIR --num 8                         # the run's checkpoint on its val set
    uv run tools/visualize.py --dets DT.json --gt GT.json --images DIR --ids 3 17 --score-thresh 0.3

Images are upscaled (``--scale``, default 3) so labels stay readable on small images. Files are
named ``IMAGEID.png`` in ``--out`` (default: RUN/vis, or ./vis); an image id with characters other
than letters, digits, ``.``, ``_`` and ``-`` is sanitised (plus a short hash of the id, so names stay
distinct), so no file is ever written outside ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn.functional import interpolate
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from detlib import runs
from detlib.data.coco import CocoDetection
from detlib.device import resolve_device, to_device
from detlib.engine.checkpoint import load as load_checkpoint
from detlib.engine.restore import build_from_run, load_run_config, load_weights
from detlib.tools.cli import ToolError, cli, prog_name
from detlib.tools.results import check_results_file, read_results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("visualize.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="run directory: predict with its checkpoint on its val set")
    p.add_argument("--checkpoint", type=Path, help=f"with --run: checkpoint (default RUN/{runs.CHECKPOINTS}/{runs.LAST})")
    p.add_argument("--device", default="auto", help="with --run: auto | cpu | cuda")
    p.add_argument("--dets", type=Path, help="COCO results file to draw (needs --gt and --images)")
    p.add_argument("--gt", type=Path, help="COCO ground-truth annotation file")
    p.add_argument("--images", type=Path, help="folder the ground truth's file_names are relative to")
    p.add_argument("--exif-orientation", choices=["apply", "ignore"], default="apply",
                   help="with --gt: apply JPEG orientation tags (boxes in the displayed frame, default) or ignore "
                        "them (boxes on the stored pixels); with --run the run's data.exif_orientation is used")
    p.add_argument("--num", type=int, default=8, help="draw the first N images (default 8)")
    p.add_argument("--ids", type=int, nargs="+", help="draw these image ids instead")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw predictions scoring at least this")
    p.add_argument("--scale", type=int, default=3, help="upscale factor for the drawings (default 3)")
    p.add_argument("--out", type=Path, help="output folder (default RUN/vis, else ./vis)")
    args = p.parse_args(argv)
    if (args.run is None) == (args.dets is None):
        p.error("give either --run RUN_DIR or --dets DT.json --gt GT.json --images DIR")
    if args.dets is not None and (args.gt is None or args.images is None):
        p.error("--dets needs --gt GT.json and --images DIR")
    if args.num < 1 or args.scale < 1:
        p.error("--num and --scale must be >= 1")
    return args


def pick(dataset: CocoDetection, ids: Sequence[int] | None, num: int) -> list[int]:
    """Dataset indices of the requested image ids, or of the first ``num`` images."""
    if not ids:
        return list(range(min(num, len(dataset))))
    index = {image_id: i for i, image_id in enumerate(dataset.ids)}
    unknown = [i for i in ids if i not in index]
    if unknown:
        raise ToolError(f"image ids not in {dataset.ann_file}: {unknown}")
    return [index[i] for i in ids]


def draw(image: Tensor, gt: dict, pred: dict, names: dict[int, str], scale: int) -> Tensor:
    """``image (3, H, W)`` float in [0, 1]; ``gt``/``pred`` boxes xyxy pixels, labels 1..K -> uint8 drawing."""
    img = interpolate(image[None], scale_factor=scale, mode="nearest")[0] if scale > 1 else image
    img = (img * 255).round().clamp(0, 255).to(torch.uint8)
    if len(gt["boxes"]):
        img = draw_bounding_boxes(img, gt["boxes"] * scale, colors="lime", width=2)
    if len(pred["boxes"]):
        labels = [f"{names[int(c)]} {s:.2f}" for c, s in zip(pred["labels"], pred["scores"].tolist())]
        img = draw_bounding_boxes(img, pred["boxes"] * scale, labels=labels, colors="red", width=2,
                                  label_colors="white", fill_labels=True)
    return img


@torch.no_grad()
def predict_one(model: nn.Module, image: Tensor, target: dict, device: torch.device) -> dict:
    """Detections of one image; the target goes along because Fast R-CNN mode finds proposals by image id."""
    images, targets = to_device(device, [image], [target])
    out = model(images, targets, detect=True)["detections"][0]
    return {k: v.cpu() for k, v in out.items()}


def from_results(by_image: dict[int, list[dict]], cat_to_label: dict[int, int], image: Tensor, target: dict) -> dict:
    """The COCO results of ``target``'s image -> ``boxes (D, 4)`` xyxy, ``scores``, ``labels`` 1..K."""
    mine = by_image.get(target["image_id"], [])
    boxes = torch.tensor([r["bbox"] for r in mine], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    return {"boxes": boxes, "scores": torch.tensor([float(r["score"]) for r in mine]),
            "labels": torch.tensor([cat_to_label[r["category_id"]] for r in mine], dtype=torch.int64)}


def open_source(args: argparse.Namespace) -> tuple[CocoDetection, Callable[[Tensor, dict], dict]]:
    """The images to draw and a function ``(image, target) -> predictions``: a run's model or a detections file."""
    if args.run is not None:
        ckpt = args.checkpoint or runs.last_checkpoint(args.run)
        saved = load_checkpoint(ckpt)  # a bad checkpoint is refused before any data is built
        model, dataset = build_from_run(load_run_config(args.run), args.run)
        load_weights(model, ckpt, state=saved)
        device = resolve_device(args.device)
        model.to(device).eval()
        return dataset, partial(predict_one, model, device=device)
    dataset = CocoDetection(args.gt, args.images, train=False, exif_orientation=args.exif_orientation)
    results = read_results(args.dets)
    check_results_file(args.dets, results, set(dataset.coco.getImgIds()), set(dataset.cat_ids))
    by_image: dict[int, list[dict]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    return dataset, partial(from_results, by_image, dataset.cat_to_label)


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def safe_name(image_id: object, suffix: str = ".png") -> str:
    """A file name for ``image_id`` that stays in its folder: ``17`` -> ``17.png``; anything outside
    ``[A-Za-z0-9._-]`` (path separators), a leading dot (``..``) or an over-long id is replaced, and a
    short hash of the id keeps two such ids from sharing a name."""
    text = str(image_id)
    name = _UNSAFE.sub("_", text)
    name = "_" + name[1:] if name.startswith(".") else name
    if name != text or not name or len(name) > 100:
        name = f"{name[:100]}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"
    return name + suffix


def output_path(out: Path, image_id: object) -> Path:
    """``out / safe_name(image_id)``, checked to lie directly inside ``out``."""
    path = out / safe_name(image_id)
    if path.resolve().parent != out.resolve():
        raise ToolError(f"image id {image_id!r}: output file {path} would lie outside --out {out}")
    return path


def keep(pred: dict, thresh: float) -> dict:
    m = pred["scores"] >= thresh
    return {k: v[m] for k, v in pred.items()}


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    dataset, predict = open_source(args)
    out = args.out or (args.run / "vis" if args.run is not None else Path("vis"))
    out.mkdir(parents=True, exist_ok=True)
    names = dict(enumerate(dataset.class_names, start=1))
    for i in pick(dataset, args.ids, args.num):
        image, target = dataset[i]
        pred = keep(predict(image, target), args.score_thresh)
        path = output_path(out, target["image_id"])
        write_png(draw(image, target, pred, names, args.scale), str(path))
        print(f"{path}: {len(target['boxes'])} ground truth, {len(pred['boxes'])} predictions >= {args.score_thresh}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "visualize.py")
