"""COCO box AP of a trained run's checkpoint, or of a COCO-results file against its ground truth.

    uv run tools/evaluate.py --run RUN_DIR                              # checkpoints/last.pt on the run's val set
    uv run tools/evaluate.py --run RUN_DIR --checkpoint RUN_DIR/checkpoints/model_0000500.pt --device cpu
    uv run tools/evaluate.py --run RUN_DIR --config-overrides data=coco data.root=/data/coco ...
    uv run tools/evaluate.py --run RUN_DIR --amp off                    # fp32 whatever the run trained in
    uv run tools/evaluate.py --gt instances_val.json --dt detections.json --out metrics.json

Both modes write the 12 COCO stats with the keys of a run's ``metrics.json`` (``--out``) and print
them as a table, followed by AP per class. Checkpoint mode also writes the detections as a
COCO-results file (``--dets``), which file mode and ``tools/visualize.py`` read back, and scores the
metrics the run's ``eval.metrics`` names (VOC07 AP50 on Pascal VOC) into ``eval_detail.json``, as training does. Checkpoint mode runs
the model as the run's own validation did: its ``trainer.amp`` autocast (CPU included; ``--amp`` to change
it) and its ``trainer.channels_last`` backbone.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from detlib import runs
from detlib.data.coco_files import coco_from_dict, load_coco_json
from detlib.data.validation import evaluation_ground_truth
from detlib.evaluation import backends
from detlib.evaluation.coco_eval import evaluate_coco, format_table
from detlib.evaluation.evaluators import compute, extra_metrics
from detlib.evaluation.report import category_names, eval_detail, metrics
from detlib.jsonio import write_json
from detlib.tools.cli import ToolError, cli, prog_name
from detlib.tools.results import check_results_file, read_results

# Scoring two files (--gt --dt) imports pycocotools and the backend only (not omegaconf, not torch); a checkpoint
# (--run) imports torch and the model.


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("evaluate.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("checkpoint mode")
    src.add_argument("--run", type=Path, help="run directory made by train.py")
    src.add_argument("--checkpoint", type=Path, help=f"checkpoint to evaluate (default: RUN/{runs.CHECKPOINTS}/{runs.LAST})")
    src.add_argument("--config-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                     help="changes to the run's config, e.g. data=coco data.root=/data/coco ...")
    src.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    src.add_argument("--weights", choices=["auto", "ema", "model"], default="auto",
                     help="auto: the EMA of the weights when the run kept one (what its own evaluation scored), "
                          "else the weights; ema | model: those")
    src.add_argument("--amp", choices=("run", "off", "bf16", "fp16"), default="run",
                     help="autocast precision (default: the run's trainer.amp, on any device, as its own validation)")
    src.add_argument("--dets", type=Path, help="where to write the detections (default: next to --out)")
    files = p.add_argument_group("file mode")
    files.add_argument("--gt", type=Path, help="COCO ground-truth annotation file")
    files.add_argument("--dt", type=Path, help="COCO results file (list of image_id, category_id, bbox, score)")
    p.add_argument("--backend", choices=backends.BACKENDS,
                   help="COCO evaluation backend, same numbers (default: the run's eval.backend, else auto: "
                        f"the fastest installed of {', '.join(backends.AUTO)}, else pycocotools)")
    p.add_argument("--out", type=Path, help=f"metrics JSON to write (default: RUN/{runs.EVAL_DIR}/{runs.METRICS} in checkpoint "
                                            "mode, none in file mode)")
    files.add_argument("--detail", type=Path, help=f"file mode: also write {runs.EVAL_DETAIL}'s content (AP per IoU "
                       "and per class, TIDE errors, true positives' IoU) here")
    args = p.parse_args(argv)
    if (args.run is None) == (args.gt is None):
        p.error("give either --run RUN_DIR (checkpoint mode) or --gt GT.json --dt DT.json (file mode)")
    if args.gt is not None and args.dt is None:
        p.error("file mode needs --dt DT.json as well as --gt")
    return args


def class_table(ap: dict[str, float | None]) -> str:
    """AP@[.50:.95] per class as a small text table."""
    width = max([len(k) for k in ap] + [5])
    lines = ["AP per class", "-" * (width + 8)]
    lines += [f"{name:<{width}}  " + ("   n/a" if v is None else f"{v:6.3f}") for name, v in ap.items()]
    return "\n".join(lines)


def report(detail: dict, out: Path | None, title: str, with_detail: bool = True) -> None:
    """Print the stats and the per-class table; write ``out`` (``metrics.json``'s layout) and, with
    ``with_detail`` (checkpoint mode), next to it ``detail`` as ``eval_detail.json``, the file the trainer
    writes, so ``compare_runs.py`` reads a run evaluated afterwards (``RUN/eval/``) as the trainer's own."""
    print(format_table(detail["stats"], title))
    if detail["per_class_ap"]:
        print("\n" + class_table(detail["per_class_ap"]))
    if out is not None:
        write_json(out, metrics(detail["stats"]))
        if with_detail:
            write_json(out.with_name(runs.EVAL_DETAIL), detail)
        print(f"\nmetrics written to {out}" + (f" (AP per IoU and per class, TIDE: {out.with_name(runs.EVAL_DETAIL)})"
                                               if with_detail else ""))


def evaluate_checkpoint(args: argparse.Namespace) -> dict:
    """Rebuild the run's model and val set, load the checkpoint, evaluate; write metrics and detections."""
    from omegaconf import OmegaConf

    from detlib.device import autocast_dtype, channels_last, resolve_device
    from detlib.engine.checkpoint import load as load_checkpoint
    from detlib.engine.restore import build_from_run, load_run_config, load_weights, weights_note
    from detlib.evaluation.inference import evaluate

    cfg = load_run_config(args.run, args.config_overrides)
    metrics = extra_metrics(list(OmegaConf.select(cfg, "eval.metrics", default=None) or []))  # as training scores
    ckpt = args.checkpoint or runs.last_checkpoint(args.run)
    saved = load_checkpoint(ckpt)  # a bad checkpoint is refused before any data is built
    model, val_set = build_from_run(cfg, args.run)
    state = load_weights(model, ckpt, args.weights, saved)
    device = resolve_device(args.device)
    channels_last(model.to(device), bool(OmegaConf.select(cfg, "trainer.channels_last", default=True)))
    backend = backends.resolve(str(args.backend or OmegaConf.select(cfg, "eval.backend", default="auto")))
    amp = autocast_dtype(cfg.trainer.amp if args.amp == "run" else args.amp)
    stats, losses, results, E = evaluate(model, val_set, device, cfg.eval.batch_size, tuple(cfg.eval.max_dets),
                                          amp, backend)
    out = args.out or args.run / runs.EVAL_DIR / runs.METRICS
    dets = args.dets or out.with_name(runs.DETECTIONS)
    write_json(dets, results)
    settings = runs.eval_settings(OmegaConf.to_container(cfg, resolve=False)) | {"eval.backend": backend}
    extra = compute(metrics, results, val_set.coco)
    detail = eval_detail(state["iteration"], stats, E, category_names(val_set.coco), losses, settings,
                         weights=state["loaded"], **extra)
    report(detail, out, f"{ckpt} (iteration {state['iteration']}) with its {weights_note(state)} on {len(val_set)} images "
                        f"of {val_set.ann_file}")
    for m in metrics:
        print(f"{m.tag}: " + ("n/a" if extra[m.key]["mAP"] is None else f"{extra[m.key]['mAP']:.4f}"))
    print(f"detections written to {dets}")
    return stats


def evaluate_files(args: argparse.Namespace) -> dict:
    """Evaluate a COCO-results file against a COCO ground-truth file, with detlib's checks.

    The ground truth is scored as given, as pycocotools scores the file: boxes past the image edge
    stay as they are (no training-time clipping). Only what pycocotools would mis-score is changed,
    and logged (see ``evaluation_ground_truth``), or refused with an error naming file, entry and value.
    """
    data, _ = evaluation_ground_truth(load_coco_json(args.gt), args.gt)
    gt = coco_from_dict(data)
    results = read_results(args.dt)
    check_results_file(args.dt, results, set(gt.getImgIds()), set(gt.getCatIds()))
    backend = backends.resolve(args.backend or "auto")
    stats, E = evaluate_coco(gt, results, backend=backend)
    detail = eval_detail(None, stats, E if results else None, category_names(gt), None, {"eval.backend": backend},
                         errors=args.detail is not None)
    report(detail, args.out, f"{args.dt} against {args.gt} ({backends.label(backend)})", with_detail=False)
    if args.detail is not None:
        write_json(args.detail, detail)
        print(f"detail written to {args.detail}")
    return stats


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.run is not None and not args.run.is_dir():
        raise ToolError(f"run directory not found: {args.run}")
    evaluate_checkpoint(args) if args.run is not None else evaluate_files(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "evaluate.py")
