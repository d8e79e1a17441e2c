"""Which error a loss changed: TIDE's dAP per error type and the true positives' IoU, per group of runs.

Read from each run's ``eval_detail.json`` (``tide``, ``tp_iou``; runs made before those keys: after
``tools/evaluate.py --run RUN``). Per group: the mean over runs and its 95 % confidence interval
(Student's t over the runs, by scipy.stats), a grouped bar chart of dAP per error type, and the
distribution of the true positives' IoU with their ground truth (a loss that localises better moves it right).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from detlib.evaluation.report import TP_IOU_BINS
from detlib.evaluation.tide import ERRORS
from detlib.runs.groups import Group

COLUMNS = tuple(f"dAP {e}" for e in ERRORS) + ("TP IoU mean",)


def mean_ci(x: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None]:
    """Mean and the half-width of its t confidence interval; None where undefined."""
    if not len(x):
        return None, None
    if len(x) < 2:
        return float(np.mean(x)), None
    sem = stats.sem(x)
    return float(np.mean(x)), float(sem * stats.t.ppf((1 + confidence) / 2, len(x) - 1)) if sem > 0 else 0.0


def error_rows(groups: Sequence[Group]) -> list[dict]:
    """Per group with TIDE data: n and ``(mean, ci half-width)`` per column, AP points as fractions."""
    rows = []
    for g in groups:
        runs = [r for r in g.runs if r.tide]
        if not runs:
            continue
        row: dict = {"group": g.name, "n": len(runs)}
        for e in ERRORS:
            row[f"dAP {e}"] = mean_ci([r.tide["dAP"][e] for r in runs])
        row["TP IoU mean"] = mean_ci([r.tp_iou["mean"] for r in runs if r.tp_iou])
        rows.append(row)
    return rows


def error_table(rows: list[dict]) -> list[list[str]]:
    def cell(v: tuple[float | None, float | None], scale: float) -> str:
        m, h = v
        return "n/a" if m is None else f"{scale * m:.2f}" + ("" if h is None else f" ± {scale * h:.2f}")

    body = [["group", "n"] + [c + (" (AP pts)" if c.startswith("dAP") else " (%)") for c in COLUMNS]]
    for r in rows:
        body.append([r["group"], str(r["n"])] + [cell(r[c], 100) for c in COLUMNS])
    return body


def plot_errors(rows: list[dict], path: Path) -> None:
    """dAP per TIDE error type, one bar per group, 95 % CI as error bars."""
    fig = Figure(figsize=(9, 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        means = [100 * (r[f"dAP {e}"][0] or 0) for e in ERRORS]
        errs = [100 * (r[f"dAP {e}"][1] or 0) for e in ERRORS]
        ax.bar(np.arange(len(ERRORS)) + (i - (len(rows) - 1) / 2) * width, means, width, yerr=errs, capsize=2,
               label=f"{r['group']} (n={r['n']})")
    ax.set_xticks(range(len(ERRORS)), ERRORS)
    ax.set(ylabel="dAP50 if fixed (AP points)", title="TIDE: AP lost to each kind of error (mean, 95% CI)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_tp_iou(groups: Sequence[Group], path: Path) -> list[str]:
    """Per group, the distribution of the true positives' IoU (each run's histogram normalised, then averaged)."""
    fig = Figure(figsize=(8, 4.2))
    ax = fig.add_subplot()
    centres, drawn = (TP_IOU_BINS[:-1] + TP_IOU_BINS[1:]) / 2, []
    for g in groups:
        hists = [np.asarray(r.tp_iou["hist"], float) / max(sum(r.tp_iou["hist"]), 1) for r in g.runs if r.tp_iou]
        if not hists:
            continue
        mean_iou = np.mean([r.tp_iou["mean"] for r in g.runs if r.tp_iou])
        ax.plot(centres, np.mean(hists, axis=0), marker=".", label=f"{g.name} (mean {mean_iou:.3f}, n={len(hists)})")
        drawn.append(g.name)
    ax.set(xlabel="IoU of a true positive (at IoU 0.5) with its ground truth", ylabel="fraction of true positives",
           title="Localisation of the detections that count: further right is tighter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return drawn


def errors_section(groups: Sequence[Group], out: Path, markdown: object) -> str:
    """The comparison's error section (markdown) and its figures in ``out``; empty without TIDE data."""
    rows = error_rows(groups)
    if not rows:
        return ""
    plot_errors(rows, out / "tide.png")
    plot_tp_iou(groups, out / "tp_iou.png")
    missing = [g.name for g in groups if g.name not in {r["group"] for r in rows}]
    note = "" if not missing else (f"\n\nWithout TIDE data (run `tools/evaluate.py --run RUN`): {', '.join(missing)}.")
    return ("\n## Which errors (TIDE, Bolya et al. 2020)\n\nAP50 points each kind of error costs (fixing it alone "
            "would gain that much), and the mean IoU of the true positives with their ground truth; mean ± 95 % CI "
            "half-width over the runs.\n\n" + markdown(error_table(rows)) + "\n\n![dAP per error type](tide.png)\n\n"
            "![IoU of the true positives](tp_iou.png)" + note + "\n")
