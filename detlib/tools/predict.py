"""Detect objects in any folder of images with a trained run (no annotations needed).

    uv run tools/predict.py --run RUN --images photos/ --out preds/
    uv run tools/predict.py --run RUN --checkpoint RUN/checkpoints/model_0000500.pt --images 'shots/*.png' --out p/

Writes ``OUT/detections.json`` (COCO results: image_id, category_id, bbox xywh, score; every detection),
``OUT/images.json`` (image_id -> file, width, height, drawing) and ``OUT/<file name>.png``: each image with
its detections at or above ``--score-thresh`` drawn with class names and scores (``img0.jpg`` ->
``img0.jpg.png``, so ``img0.png``'s drawing is another file; ``-2``, ``-3`` where two folders of a glob hold
one name). ``--out`` may not hold any input image, so no drawing ever replaces an input.

Files are written as the images are processed: ``OUT/detections.jsonl`` gets one line per image (its
``images.json`` entry and its detections) at once, so a run that is killed keeps what it computed, and
``detections.json`` / ``images.json`` are written at the end, also after Ctrl-C or an error. A file with
an image suffix that does not decode is skipped, counted and named (``OUT/skipped.json``), not fatal.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from torchvision.io import write_png
from tqdm import tqdm

from detlib import runs
from detlib.data.image import ImageDecodeError, read_image
from detlib.jsonio import write_json
from detlib.predictor import Predictor
from detlib.tools.cli import ToolError, cli, prog_name
from detlib.tools.visualize import draw, keep, output_path

SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("predict.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder (its config and checkpoints)")
    p.add_argument("--checkpoint", type=Path, help=f"default: RUN/{runs.CHECKPOINTS}/{runs.LAST}")
    p.add_argument("--images", required=True, help="a folder of images or a glob pattern")
    p.add_argument("--out", type=Path, required=True, help=f"folder for {runs.DETECTIONS} and the drawn images")
    p.add_argument("--score-thresh", type=float, default=0.5, help="draw detections at or above this (default 0.5)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--amp", choices=("run", "off", "bf16", "fp16"), default="run",
                   help="autocast precision (default: the run's trainer.amp, on any device)")
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


def check_out(out: Path, files: Sequence[Path]) -> None:
    """``--out`` must not hold an input: its drawings would sit among (and could replace) the images."""
    inside = [f for f in files if f.resolve().is_relative_to(out.resolve())]
    if inside:
        raise ToolError(f"--out {out} holds {len(inside)} of the input images (first: {inside[0]}); the drawings "
                        "would be written among them: choose an output folder apart from --images")


def drawing_paths(out: Path, files: Sequence[Path]) -> list[Path]:
    """One drawing per input, named by the input's whole file name (``img0.jpg`` -> ``img0.jpg.png``), with
    ``-2``, ``-3`` where inputs of two folders share a name: no two inputs get one drawing."""
    taken: set[str] = set()
    paths = []
    for f in files:
        path, k = output_path(out, f.name), 1
        while path.name in taken:
            k += 1
            path = output_path(out, f"{f.name}-{k}")
        taken.add(path.name)
        paths.append(path)
    return paths


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run.is_dir():
        raise ToolError(f"run directory not found: {args.run}")
    files = find_images(args.images)
    check_out(args.out, files)
    predictor = Predictor.from_run(args.run, args.checkpoint, args.device,
                                   amp=None if args.amp == "run" else args.amp)
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    index: list[dict] = []
    skipped: list[dict] = []
    try:
        with (args.out / "detections.jsonl").open("w") as progress:
            for image_id, (path, drawing) in enumerate(tqdm(list(zip(files, drawing_paths(args.out, files))),
                                                            desc="predict", unit="img", disable=None), start=1):
                try:
                    image = read_image(path, predictor.exif_orientation)  # as the run's data were read
                except ImageDecodeError as e:  # a suffix that lies, a truncated file: skip, count and name it
                    skipped.append({"file_name": str(path), "reason": e.reason})
                    print(f"{prog_name('predict.py')}: warning: skipped {e}", file=sys.stderr)
                    continue
                det = predictor(image)
                entry = {"id": image_id, "file_name": str(path), "width": image.shape[2], "height": image.shape[1],
                         "drawing": drawing.name}
                found = [{"image_id": image_id, "category_id": cat, "score": score,
                          "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]}
                         for box, score, cat in zip(det["boxes"].tolist(), det["scores"].tolist(), det["category_ids"])]
                empty = {"boxes": det["boxes"][:0], "labels": det["labels"][:0]}
                write_png(draw(image, empty, keep({k: det[k] for k in ("boxes", "scores", "labels")},
                                                  args.score_thresh), predictor.names, args.scale), str(drawing))
                index.append(entry)
                results += found
                progress.write(json.dumps({"image": entry, "detections": found}) + "\n")
                progress.flush()
    finally:  # also after Ctrl-C or an error: what was computed is kept
        write_json(args.out / runs.DETECTIONS, results)
        write_json(args.out / "images.json", index)
        if skipped:
            write_json(args.out / "skipped.json", skipped)
    if not index:
        raise ToolError(f"--images {args.images}: none of the {len(files)} files could be decoded "
                        f"(first: {skipped[0]['file_name']}: {skipped[0]['reason']})")
    print(f"{len(index)} images, {len(results)} detections: {args.out / runs.DETECTIONS}; drawn (score >= "
          f"{args.score_thresh}) in {args.out}"
          + (f"; {len(skipped)} undecodable files skipped ({args.out / 'skipped.json'})" if skipped else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "predict.py")
