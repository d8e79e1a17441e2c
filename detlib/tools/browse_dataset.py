"""Training images as the model sees them, without a model: the batches the trainer's sampler serves
(same seed, same iteration, same horizontal flips) with annotation noise applied, boxes and class names drawn.

    uv run tools/browse_dataset.py                                    # the default data, iteration 0
    uv run tools/browse_dataset.py data.noise.outliers=0.4 --num 16   # Hydra overrides, as train.py takes them
    uv run tools/browse_dataset.py --run RUN --iteration 500          # the data a run trained on, at iteration 500

Green: the boxes the model trains on, with their class. With annotation noise on (``data.noise.*``),
the clean box of every changed annotation is drawn too, in white, so the corruption shows. Noise that
the box head adds to its regression targets (``model.roi_head.target_outliers``) is drawn at training
time only and cannot be shown here. Files: ``ITERATION_IMAGEID.png`` in ``--out`` (default ./browse).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig
from torch import Tensor
from torch.nn.functional import interpolate
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

from detlib import runs
from detlib.compose import compose_train
from detlib.config import Config
from detlib.data.build import build_datasets
from detlib.data.coco import CocoDetection, hflip_boxes
from detlib.data.sampler import TrainBatchSampler
from detlib.engine.restore import load_run_config, typed_config
from detlib.tools.cli import ToolError, cli, prog_name
from detlib.tools.visualize import output_path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("browse_dataset.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.py (data=coco, data.noise.jitter=0.1)")
    p.add_argument("--run", type=Path, help=f"browse the data of this run (its {runs.RECORD}), overrides on top")
    p.add_argument("--iteration", type=int, default=0, help="first training iteration to draw (default 0)")
    p.add_argument("--num", type=int, default=8, help="number of images (default 8; batches in order)")
    p.add_argument("--scale", type=int, default=3, help="upscale factor for the drawings (default 3)")
    p.add_argument("--out", type=Path, default=Path("browse"), help="output folder (default ./browse)")
    args = p.parse_args(argv)
    if args.num < 1 or args.scale < 1 or args.iteration < 0:
        p.error("--num and --scale must be >= 1, --iteration >= 0")
    return args


def load_config(run: Path | None, overrides: Sequence[str]) -> tuple[DictConfig, Config]:
    """The composed (or the run's) config with ``overrides``, and its checked typed form."""
    try:
        cfg = load_run_config(run, overrides) if run is not None else compose_train(overrides)
    except HydraException as e:
        cause = f" ({str(e.__cause__).splitlines()[0]})" if e.__cause__ is not None else ""
        raise ToolError(str(e).splitlines()[0] + cause) from e
    return cfg, typed_config(cfg)


def served(dataset: CocoDetection, sampler: TrainBatchSampler, iteration: int, num: int) -> list[tuple[int, Tensor, dict]]:
    """``(iteration, image, target)`` for the first ``num`` images the trainer gets from ``iteration`` on."""
    out: list[tuple[int, Tensor, dict]] = []
    while len(out) < num:
        out += [(iteration, *dataset[item]) for item in sampler.batch(iteration)]
        iteration += 1
    return out[:num]


def clean_boxes(dataset: CocoDetection, target: dict, width: int) -> Tensor:
    """``(N, 4)`` xyxy: the annotations before noise, flipped as the served image was."""
    boxes = torch.from_numpy(dataset._boxes_of(target["image_id"])[0].copy())
    return hflip_boxes(boxes, width) if target["hflip"] else boxes


def draw(image: Tensor, boxes: Tensor, labels: list[str], clean: Tensor | None, scale: int) -> Tensor:
    """``image (3, H, W)`` float in [0, 1], ``boxes (N, 4)`` xyxy -> uint8 drawing, ``scale`` times larger."""
    img = interpolate(image[None], scale_factor=scale, mode="nearest")[0] if scale > 1 else image
    img = (img * 255).round().clamp(0, 255).to(torch.uint8)
    if clean is not None and len(clean):
        img = draw_bounding_boxes(img, clean * scale, colors="white", width=1)
    if len(boxes):
        img = draw_bounding_boxes(img, boxes * scale, labels=labels, colors="lime", width=2, label_colors="black",
                                  fill_labels=True)
    return img


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _, typed = load_config(args.run, args.overrides)
    train_set, _ = build_datasets(typed.data)
    sampler = TrainBatchSampler(len(train_set), typed.data.batch_size, typed.seed, args.iteration,
                                group_ids=getattr(train_set, "group_ids", None))  # as the trainer builds it
    noisy = typed.data.noise.jitter > 0 or typed.data.noise.outliers > 0
    names = dict(enumerate(train_set.class_names, start=1))
    args.out.mkdir(parents=True, exist_ok=True)
    items = served(train_set, sampler, args.iteration, args.num)
    for iteration, image, target in items:
        clean = clean_boxes(train_set, target, image.shape[-1]) if noisy else None
        labels = [names[int(c)] for c in target["labels"]]
        drawing = draw(image, target["boxes"], labels, clean, args.scale)
        write_png(drawing, str(output_path(args.out, f"{iteration}_{target['image_id']}")))
    flips = sum(t["hflip"] for _, _, t in items)
    print(f"wrote {len(items)} training images (iterations {args.iteration}-{items[-1][0]}, {flips} flipped"
          f"{', annotation noise drawn against the clean boxes' if noisy else ''}) to {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "browse_dataset.py")
