"""Detect objects in any folder of images with a trained run (no annotations needed).

    uv run tools/predict.py --run RUN --images photos/ --out preds/
    uv run tools/predict.py --run RUN --checkpoint RUN/checkpoints/model_0000500.pt --images 'shots/*.png' --out p/

Writes ``OUT/detections.json`` (COCO results: image_id, category_id, bbox xywh, score; every detection),
``OUT/images.json`` (image_id -> file, width, height) and ``OUT/<name>.png``: each image with its
detections at or above ``--score-thresh`` drawn with class names and scores.
"""

from __future__ import annotations

import argparse
import glob
from collections.abc import Sequence
from pathlib import Path

from torchvision.io import write_png
from tqdm import tqdm

from detlib.data.image import read_image
from detlib.jsonio import write_json
from detlib.predictor import Predictor
from detlib.tools.cli import ToolError, cli, prog_name
from detlib.tools.visualize import draw, keep, output_path

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("predict.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder (its config and checkpoints)")
    p.add_argument("--checkpoint", type=Path, help="default: RUN/checkpoints/last.pt")
    p.add_argument("--images", required=True, help="a folder of images or a glob pattern")
    p.add_argument("--out", type=Path, required=True, help="folder for detections.json and the drawn images")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections at or above this (default 0.5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--scale", type=int, default=1, help="draw the images this many times larger (default 1)")
    return p.parse_args(argv)


def find_images(spec: str) -> list[Path]:
    """The image files of a folder (by suffix, sorted) or of a glob pattern (sorted)."""
    path = Path(spec)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES) if path.is_dir() else \
        sorted(Path(p) for p in glob.glob(spec) if Path(p).is_file())
    if not files:
        raise ToolError(f"--images {spec}: no image files found")
    return files


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run.is_dir():
        raise ToolError(f"run directory not found: {args.run}")
    files = find_images(args.images)
    predictor = Predictor.from_run(args.run, args.checkpoint, args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    results, index = [], []
    for image_id, path in enumerate(tqdm(files, desc="predict", unit="img", disable=None), start=1):
        image = read_image(path, predictor.exif_orientation)  # as the run's data were read
        det = predictor(image)
        index.append({"id": image_id, "file_name": str(path), "width": image.shape[2], "height": image.shape[1]})
        for box, score, cat in zip(det["boxes"].tolist(), det["scores"].tolist(), det["category_ids"]):
            results.append({"image_id": image_id, "category_id": cat, "score": score,
                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        empty = {"boxes": det["boxes"][:0], "labels": det["labels"][:0]}
        write_png(draw(image, empty, keep({k: det[k] for k in ("boxes", "scores", "labels")}, args.score_thresh),
                       predictor.names, args.scale), str(output_path(args.out, path.stem)))
    write_json(args.out / "detections.json", results)
    write_json(args.out / "images.json", index)
    print(f"{len(files)} images, {len(results)} detections: {args.out / 'detections.json'}; drawn (score >= "
          f"{args.score_thresh}) in {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "predict.py")
