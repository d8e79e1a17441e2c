"""Export a run's model as TorchScript (``detlib.export``): ``--out model.ts``, loadable with ``torch.jit.load`` after ``import torchvision`` (which registers ``torchvision::nms``).

    uv run tools/export.py --run RUN --out model.ts [--checkpoint P] [--example IMAGE]

The trace is made on ``--example`` (default: a grey image of the run's ``model.min_size``) and then checked
against the eager model on it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch

from detlib import runs
from detlib.data.image import read_image
from detlib.export import export_torchscript
from detlib.predictor import Predictor
from detlib.tools.cli import ToolError, cli, prog_name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("export.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="a run folder")
    p.add_argument("--checkpoint", type=Path, help=f"default: RUN/{runs.CHECKPOINTS}/{runs.LAST}")
    p.add_argument("--out", type=Path, required=True, help="the TorchScript file to write")
    p.add_argument("--example", type=Path, help="an image to trace on (default: grey, min_size square)")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.run.is_dir():
        raise ToolError(f"run directory not found: {args.run}")
    predictor = Predictor.from_run(args.run, args.checkpoint, "cpu")
    if args.example is not None:
        example = read_image(args.example)
    else:
        side = predictor.model.transform.min_size[-1] if hasattr(predictor.model, "transform") else 224
        example = torch.full((3, side, side), 0.5)
    traced = export_torchscript(predictor.model, example, args.out)
    with torch.no_grad():
        eager, scripted = predictor.model([example], None, detect=True)["detections"][0], traced(example)
    same = len(eager["boxes"]) == len(scripted[0]) and torch.allclose(eager["boxes"], scripted[0], atol=1e-4)
    if not same:
        raise ToolError(f"the traced model's detections differ from the eager model's on the example; {args.out} "
                        "is written but should not be used")
    print(f"wrote {args.out} (TorchScript; {len(scripted[0])} detections on the example, equal to the eager model's); "
          "load it with: import torch, torchvision; m = torch.jit.load(...)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "export.py")
