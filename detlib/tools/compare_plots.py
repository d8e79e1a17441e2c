"""The comparison's figures: AP at each IoU threshold, the metric per group, the metric against a config key.

Drawn on ``matplotlib.figure.Figure`` objects (no pyplot state), so the sweep callback can draw them
inside the training process.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from detlib.evaluation.stats import mean_std
from detlib.runs.groups import Group
from detlib.tools.cli import ToolError


def _save(fig: Figure, ax: Axes, path: Path, legend: bool = True, **labels: str) -> None:
    ax.set(**labels)
    ax.grid(alpha=0.3, **({} if legend else {"axis": "y"}))
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_ap_per_iou(groups: Sequence[Group], path: Path) -> list[str]:
    """AP at each IoU threshold, one curve per group (mean over its runs); returns the groups drawn."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    drawn = []
    for g in groups:
        curves = [r.ap_per_iou for r in g.runs if r.ap_per_iou]
        if not curves:
            continue
        thrs = sorted(curves[0], key=float)
        ys = []
        for t in thrs:
            vals = [c[t] for c in curves if c.get(t) is not None]
            ys.append(100 * sum(vals) / len(vals) if vals else math.nan)
        ax.plot([float(t) for t in thrs], ys, marker="o", label=f"{g.name} (n={len(curves)})")
        drawn.append(g.name)
    if drawn:
        _save(fig, ax, path, xlabel="IoU threshold", ylabel="AP (%)", title="AP at each IoU threshold (mean over seeds)")
    return drawn


def plot_bar(rows: list[dict], metric: str, baseline: str, path: Path) -> None:
    """Mean ``metric`` per group with ± std error bars; the baseline in grey."""
    fig = Figure(figsize=(max(5, 0.9 * len(rows) + 2), 4.5))
    ax = fig.subplots()
    means = [100 * (r[metric] or 0) for r in rows]
    errs = [100 * (r[f"{metric}_std"] or 0) for r in rows]
    colors = ["tab:gray" if r["group"] == baseline else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color=colors)
    ax.set_xticks(range(len(rows)), [f"{r['group']}\n(n={r['n']})" for r in rows], rotation=30, ha="right",
                  fontsize=8)
    lo = min(m - e for m, e in zip(means, errs))
    ax.set_ylim(max(0.0, lo - 5), max(m + e for m, e in zip(means, errs)) + 2)
    _save(fig, ax, path, legend=False, ylabel=f"{metric} (%)", title=f"{metric}: mean ± std over seeds (grey: baseline)")


def plot_against(groups: Sequence[Group], key: str, metric: str, path: Path) -> dict[str, list[tuple[float, float]]]:
    """``metric`` (mean ± std over seeds) against the config value ``key``, one line per remaining setting
    (e.g. AP against ``data.noise.outliers``, one line per loss). Returns each series' (x, mean) points."""
    series: dict[str, list[tuple[float, list[float]]]] = {}
    for g in groups:
        if key not in g.runs[0].identity:
            raise ToolError(f"--x {key}: not a config key of the runs (e.g. data.noise.outliers)")
        name = ",".join(part for part in g.name.split(",") if not part.startswith(f"{key}=")) or "runs"
        series.setdefault(name, []).append((float(g.runs[0].identity[key]), g.values(metric)))
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    drawn = {}
    for name, points in series.items():
        points.sort()
        xs = [x for x, v in points if v]
        stats = [mean_std(v) for _, v in points if v]
        drawn[name] = [(x, m) for x, (m, _) in zip(xs, stats)]
        ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * (sd or 0) for _, sd in stats], marker="o", capsize=3,
                    label=name)
    _save(fig, ax, path, xlabel=key, ylabel=f"{metric} (%)", title=f"{metric} against {key} (mean ± std over seeds)")
    return drawn
