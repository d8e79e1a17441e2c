"""Draw any logged keys of one or several runs from their ``metrics.jsonl`` (no TensorBoard needed),
as mmdetection's ``analyze_logs.py plot_curve``:

    uv run tools/plot_logs.py RUN_A RUN_B --keys loss/total loss/box_reg val/AP --out curves.png
    uv run tools/plot_logs.py RUN --list          # the keys the run logged

One panel per key, one line per run (named by its folder), against the iteration. Runs of an older detlib,
which logged the losses and lr as ``train/loss``, ``train/loss_box_reg``, ``train/lr``, are read under
today's names (``loss/total``, ``loss/box_reg``, ``lr``), and the old names are accepted in ``--keys``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure

from detlib.runs import METRICS_JSONL, current_tag
from detlib.tools.cli import ToolError, cli, prog_name


def read_log(run: Path) -> list[dict]:
    """The records of ``run/metrics.jsonl`` (a half-written last line is skipped), keys by today's names."""
    path = run / METRICS_JSONL if run.is_dir() else run
    if not path.is_file():
        raise ToolError(f"{path}: not found (runs log {METRICS_JSONL} since this version; older ones: TensorBoard)")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise ToolError(f"{path}:{n}: not a metrics record (no integer 'iteration')")
        records.append({current_tag(k): v for k, v in record.items()})
    return records


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(r["iteration"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in points], [float(p[1]) for p in points]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("plot_logs.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN", help=f"run folders (or {METRICS_JSONL} files)")
    p.add_argument("--keys", nargs="+", default=["loss/total", "val/AP"], help="keys to draw (default loss/total val/AP)")
    p.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write (default curves.png)")
    p.add_argument("--list", action="store_true", help="print the keys the runs logged and stop")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logs = {r: read_log(r) for r in args.runs}
    keys = sorted({k for records in logs.values() for r in records for k in r} - {"iteration", "time"})
    if args.list:
        print("\n".join(keys))
        return 0
    args.keys = [current_tag(k) for k in args.keys]  # train/loss (an older detlib's name): loss/total
    unknown = [k for k in args.keys if k not in keys]
    if unknown:
        raise ToolError(f"--keys {' '.join(unknown)}: not logged by these runs (--list shows what is)")
    fig = Figure(figsize=(6.5, 3.2 * len(args.keys)))
    for i, key in enumerate(args.keys):
        ax = fig.add_subplot(len(args.keys), 1, i + 1)
        for run_dir, records in logs.items():
            x, y = series(records, key)
            ax.plot(x, y, marker="." if len(x) < 30 else None, label=run_dir.name if run_dir.is_dir() else str(run_dir))
        ax.set(title=key, xlabel="iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "plot_logs.py")
