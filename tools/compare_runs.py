"""Compare finished runs: mean ± std over seeds, difference from a baseline with a paired t-test, AP vs IoU.

    uv run tools/compare_runs.py multirun/2026-01-01/12-00-00                 # one sweep
    uv run tools/compare_runs.py /work/sweeps --baseline loss=smooth_l1 --out report/
    uv run tools/compare_runs.py SWEEP_A SWEEP_B --x data.noise.outliers   # + AP against the outlier fraction

Every folder under the DIRs with a ``run.json`` (or, made by older detlib, ``.hydra/config.yaml``) is
a run (a multirun folder, a single run, or a folder of sweeps all work). A run's set-up is read from
its ``run.json``, written once when it started, never from Hydra's ``.hydra`` files (a later launch
in the folder rewrites those). Runs whose identity (``detlib.engine.run_record``: the config minus
the keys that don't change results, plus world size and a fingerprint of the annotation files) is
equal except for the seed form a group, so runs on different data never share one;
named by the overrides that tell the groups apart (``loss=huber``); a key overridden in one sweep
and left at its default in another is named in both (``loss=l2,data.noise.outliers=0.0``), so
sweeps run at different times combine. Runs made by older code still
match newer ones: keys added to ``detlib.config`` since take their defaults, and a key that only
some runs have, with one value wherever it appears, is left out. A run without ``metrics.json``
is listed as unfinished. Differences from the baseline are tested by a paired t-test on the runs
matched by seed (runs of one seed in one group are averaged first).

Writes ``comparison.md``, ``comparison.csv``, ``ap_per_iou.png`` and ``ap_bar.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from omegaconf.errors import OmegaConfBaseException  # noqa: E402
from rundir import ToolError, cli  # noqa: E402
from ttest import mean_std, paired_t  # noqa: E402

from detlib.config import Config  # noqa: E402
from detlib.engine import run_record  # noqa: E402

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Keys that say how a run was executed, not what was trained: left out of a group's identity.
IGNORED = ("seed", "trainer.progress", "trainer.device", "trainer.resume", "trainer.num_threads",
           "trainer.log_period", "trainer.checkpoint_period", "trainer.keep_last", "data.root",
           "data.num_workers", "hydra", "experiment")


@dataclass
class Run:
    path: Path
    seed: int
    identity: dict[str, object]  # flattened config minus IGNORED
    overrides: list[str]  # overrides.yaml minus IGNORED
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option (hydra.runtime.choices)
    metrics: dict | None = None  # None: unfinished
    ap_per_iou: dict[str, float | None] | None = None
    problem: str = ""
    legacy: bool = False  # no run.json: set-up read from Hydra's rewritable .hydra files


@dataclass
class Group:
    name: str
    runs: list[Run] = field(default_factory=list)

    def values(self, metric: str) -> list[float]:
        return [r.metrics[metric] for r in self.runs if r.metrics.get(metric) is not None]

    def by_seed(self, metric: str) -> dict[int, float]:
        """The metric per seed (averaged over runs of the same seed)."""
        seeds: dict[int, list[float]] = {}
        for r in self.runs:
            if r.metrics.get(metric) is not None:
                seeds.setdefault(r.seed, []).append(r.metrics[metric])
        return {s: sum(v) / len(v) for s, v in seeds.items()}


# ---------------------------------------------------------------------------------------------
# Finding and grouping runs.


def _natural(p: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))]


def find_runs(dirs: Sequence[Path]) -> list[Path]:
    """Every folder under ``dirs`` holding ``run.json`` or ``.hydra/config.yaml`` (not looking inside a run)."""
    found = []
    for d in dirs:
        if not d.is_dir():
            raise ToolError(f"not a folder: {d}")
        for root, subdirs, _ in os.walk(d):
            if (Path(root) / run_record.RECORD).is_file() or (Path(root) / ".hydra" / "config.yaml").is_file():
                found.append(Path(root))
                subdirs.clear()
            else:
                subdirs[:] = [s for s in subdirs if not s.startswith(".")]
    return sorted(set(found), key=_natural)


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED)


def flatten(node: object, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists are kept as JSON strings."""
    if not isinstance(node, dict):
        return {prefix: json.dumps(node) if isinstance(node, list) else node}
    out: dict[str, object] = {}
    for k, v in node.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _read_json(path: Path) -> object | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def load_run(path: Path) -> Run:
    """Read a run's record, metrics and AP per IoU; missing results leave ``metrics`` None."""
    if (path / run_record.RECORD).is_file():
        run = _from_record(path)
    else:
        run = _from_hydra_files(path)
    if run.problem:
        return run
    return _with_metrics(run)


def _from_record(path: Path) -> Run:
    try:
        record = run_record.read_record(path)
    except run_record.RunIdentityError as e:
        return Run(path, -1, {}, [], problem=str(e))
    identity = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in record["identity"].items()
                if k != "seed"}
    overrides = [o for o in record.get("overrides", []) if not _ignored(o.split("=", 1)[0].lstrip("+~"))]
    return Run(path, int(record["identity"].get("seed", 0)), identity, overrides,
               {k: str(v) for k, v in (record.get("choices") or {}).items()})


def _from_hydra_files(path: Path) -> Run:
    """A run made before ``run.json`` existed: its set-up as its ``.hydra`` files say (a later launch in its
    folder may have rewritten them)."""
    try:
        cfg = OmegaConf.to_container(_with_schema_defaults(OmegaConf.load(path / ".hydra" / "config.yaml")),
                                     resolve=False)
        ov_file = path / ".hydra" / "overrides.yaml"
        overrides = [str(o) for o in OmegaConf.load(ov_file)] if ov_file.is_file() else []
        hydra_file = path / ".hydra" / "hydra.yaml"
        hydra = OmegaConf.to_container(OmegaConf.load(hydra_file), resolve=False) if hydra_file.is_file() else {}
    except Exception as e:  # noqa: BLE001 - yaml and OmegaConf raise many types; one bad run must not stop the rest
        return Run(path, -1, {}, [], problem=f"unreadable .hydra files ({type(e).__name__})")
    overrides = [o for o in overrides if not _ignored(o.split("=", 1)[0].lstrip("+~"))]
    identity = {k: v for k, v in flatten(cfg).items() if not _ignored(k)}
    choices = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices") or {}
    return Run(path, int(cfg.get("seed", 0)), identity, overrides,
               {k: str(v) for k, v in choices.items() if v is not None and not k.startswith("hydra/")},
               legacy=True)


def _with_metrics(run: Run) -> Run:
    path = run.path
    metrics_file = path / "metrics.json"
    if not metrics_file.is_file():
        run.problem = "no metrics.json (unfinished)"
        return run
    metrics = _read_json(metrics_file)
    if not isinstance(metrics, dict) or "AP" not in metrics:
        run.problem = "metrics.json unreadable or without AP"
        return run
    run.metrics = metrics
    run.ap_per_iou = _ap_per_iou(path, metrics["AP"])
    return run


def _with_schema_defaults(cfg: DictConfig) -> DictConfig:
    """Keys added to ``detlib.config`` since the run was made get their defaults, so old and new runs compare."""
    try:
        return OmegaConf.merge(OmegaConf.structured(Config), cfg)
    except OmegaConfBaseException:  # a key since removed or retyped: compare the config as saved
        return cfg


def _ap_per_iou(path: Path, ap: float | None) -> dict | None:
    """AP per IoU from the trainer's ``eval_detail.json``, else from one ``tools/evaluate.py`` wrote
    afterwards (``RUN/eval/``, for runs older than that file) if it evaluated the same thing (same AP)."""
    own, later = _read_json(path / "eval_detail.json"), _read_json(path / "eval" / "eval_detail.json")
    if isinstance(own, dict) and own.get("ap_per_iou"):
        return own["ap_per_iou"]
    if isinstance(later, dict) and later.get("ap_per_iou") and ap is not None:
        if abs((later.get("stats") or {}).get("AP", math.nan) - ap) < 1e-9:
            return later["ap_per_iou"]
    return None


def _key(identity: dict[str, object]) -> str:
    return json.dumps(sorted(identity.items()), default=str)


def _new_keys(runs: Sequence[Run]) -> set[str]:
    """Keys some runs lack while every run that has them agrees on the value: added to a config file later."""
    values: dict[str, set[str]] = {}
    for r in runs:
        for k, v in r.identity.items():
            values.setdefault(k, set()).add(repr(v))
    return {k for k, v in values.items() if len(v) == 1 and any(k not in r.identity for r in runs)}


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Runs with equal identity (config minus seed and IGNORED keys) form a group, in order of appearance."""
    groups: dict[str, Group] = {}
    skip = _new_keys(runs)
    for r in runs:
        groups.setdefault(_key({k: v for k, v in r.identity.items() if k not in skip}), Group("")).runs.append(r)
    out = list(groups.values())
    _name_groups(out)
    return out


def seed_warnings(groups: Sequence[Group]) -> list[str]:
    """Runs of one group that share a seed: the same set-up twice (they are averaged, not paired twice)."""
    out = []
    for g in groups:
        by_seed: dict[int, list[Run]] = {}
        for r in g.runs:
            by_seed.setdefault(r.seed, []).append(r)
        for seed, runs in by_seed.items():
            if len(runs) > 1:
                out.append(f"group {g.name}: {len(runs)} runs share seed {seed} ({', '.join(str(r.path) for r in runs)}); "
                           "they are averaged into one value for the paired test")
    return out


def legacy_warnings(runs: Sequence[Run]) -> list[str]:
    legacy = [r for r in runs if r.legacy]
    if not legacy:
        return []
    return [f"{len(legacy)} runs have no run.json (made by an older detlib): their set-up is read from .hydra "
            f"files, which a later launch in the folder may have rewritten (first: {legacy[0].path})"]


def _override_values(run: Run, keys: Sequence[str]) -> dict[str, str | None]:
    """The run's value of each overridden ``key``: its own override, else what the run used without one
    (the config value, or the config group's choice from ``.hydra/hydra.yaml``); None if unknown."""
    given = {k.lstrip("+"): v for k, _, v in (o.partition("=") for o in run.overrides) if _}
    return {k: given[k] if k in given else str(run.identity[k]) if k in run.identity else run.choices.get(k)
            for k in keys}


def _short(value: object) -> object:
    """Data fingerprints (64 hex digits) named by their first 8."""
    return f"{value[:8]}…" if isinstance(value, str) and len(value) == 64 else value


def _name_groups(groups: list[Group]) -> None:
    """Name each group by the overrides that tell it apart (``loss=huber``). A key overridden in one sweep
    and left at its default in another is named in both (``loss=l2,data.noise.outliers=0.0``), so runs of
    several sweeps combine under one naming. Falls back to the differing config keys."""
    keys = list(dict.fromkeys(o.partition("=")[0].lstrip("+") for g in groups for o in g.runs[0].overrides
                              if "=" in o))
    values = [_override_values(g.runs[0], keys) for g in groups]
    differ = [k for k in keys if len({v[k] for v in values}) > 1]
    names = [",".join(f"{k}={v[k]}" for k in differ if v[k] is not None) for v in values]
    if len(set(names)) < len(names) or not all(names):
        keys = sorted({k for g in groups for k in g.runs[0].identity})
        differ = [k for k in keys if len({repr(g.runs[0].identity.get(k)) for g in groups}) > 1]
        names = [",".join(f"{k}={_short(g.runs[0].identity.get(k))}" for k in differ) or ",".join(g.runs[0].overrides)
                 for g in groups]
    for g, n in zip(groups, names):
        g.name = n or "defaults"


# ---------------------------------------------------------------------------------------------
# The comparison and its outputs.


def compare(groups: Sequence[Group], baseline: Group) -> list[dict]:
    """One row per group: n, seeds, mean/std per metric, difference from baseline, paired p-value, pairs."""
    rows = []
    for g in groups:
        row: dict = {"group": g.name, "n": len(g.runs), "seeds": sorted({r.seed for r in g.runs})}
        for m in METRICS:
            mean, std = mean_std(g.values(m))
            base_mean, _ = mean_std(baseline.values(m))
            a, b = g.by_seed(m), baseline.by_seed(m)
            common = sorted(set(a) & set(b))
            row[m] = mean
            row[f"{m}_std"] = std
            row[f"{m}_diff"] = None if mean is None or base_mean is None else mean - base_mean
            row[f"{m}_p"] = None if g is baseline else paired_t([a[s] for s in common], [b[s] for s in common])
            row[f"{m}_pairs"] = len(common)
        rows.append(row)
    return rows


def _pct(v: float | None, sign: bool = False) -> str:
    return "n/a" if v is None else (f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}")


def _p(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def table(rows: list[dict], metric: str, baseline: str) -> list[list[str]]:
    """Header and formatted cells (AP in %, mean ± std)."""
    head = ["group", "n"] + list(METRICS) + [f"Δ{metric} vs {baseline}", "p (paired t)", "pairs"]
    body = [head]
    for r in rows:
        cells = [r["group"], str(r["n"])]
        for m in METRICS:
            std = r[f"{m}_std"]
            cells.append(_pct(r[m]) + ("" if std is None else f" ± {_pct(std)}"))
        is_base = r["group"] == baseline
        cells += ["baseline" if is_base else _pct(r[f"{metric}_diff"], sign=True),
                  "" if is_base else _p(r[f"{metric}_p"]), "" if is_base else str(r[f"{metric}_pairs"])]
        body.append(cells)
    return body


def format_text(body: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in body) for i in range(len(body[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_markdown(body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in body]
    lines.insert(1, "|" + "|".join("---" for _ in body[0]) + "|")
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    cols = ["group", "n", "seeds"] + [f"{m}{s}" for m in METRICS for s in ("", "_std", "_diff", "_p", "_pairs")]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r[c] is None else (" ".join(map(str, r[c])) if c == "seeds" else r[c]) for c in cols])


def plot_ap_per_iou(groups: Sequence[Group], path: Path) -> list[str]:
    """AP at each IoU threshold, one curve per group (mean over its runs); returns the groups drawn."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
        ax.set(xlabel="IoU threshold", ylabel="AP (%)", title="AP at each IoU threshold (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def plot_bar(rows: list[dict], metric: str, baseline: str, path: Path) -> None:
    """Mean ``metric`` per group with ± std error bars; the baseline in grey."""
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(rows) + 2), 4.5))
    means = [100 * (r[metric] or 0) for r in rows]
    errs = [100 * (r[f"{metric}_std"] or 0) for r in rows]
    colors = ["tab:gray" if r["group"] == baseline else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), means, yerr=errs, capsize=4, color=colors)
    ax.set_xticks(range(len(rows)), [f"{r['group']}\n(n={r['n']})" for r in rows], rotation=30, ha="right",
                  fontsize=8)
    lo = min(m - e for m, e in zip(means, errs))
    ax.set_ylim(max(0.0, lo - 5), max(m + e for m, e in zip(means, errs)) + 2)
    ax.set(ylabel=f"{metric} (%)", title=f"{metric}: mean ± std over seeds (grey: baseline)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_against(groups: Sequence[Group], key: str, metric: str, path: Path) -> dict[str, list[tuple[float, float]]]:
    """``metric`` (mean ± std over seeds) against the config value ``key``, one line per remaining setting
    (e.g. AP against ``data.noise.outliers``, one line per loss). Returns each series' (x, mean) points."""
    series: dict[str, list[tuple[float, list[float]]]] = {}
    for g in groups:
        if key not in g.runs[0].identity:
            raise ToolError(f"--x {key}: not a config key of the runs (e.g. data.noise.outliers)")
        name = ",".join(part for part in g.name.split(",") if not part.startswith(f"{key}=")) or "runs"
        series.setdefault(name, []).append((float(g.runs[0].identity[key]), g.values(metric)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = {}
    for name, points in series.items():
        points.sort()
        xs = [x for x, v in points if v]
        stats = [mean_std(v) for _, v in points if v]
        drawn[name] = [(x, m) for x, (m, _) in zip(xs, stats)]
        ax.errorbar(xs, [100 * m for m, _ in stats], yerr=[100 * (sd or 0) for _, sd in stats], marker="o", capsize=3,
                    label=name)
    ax.set(xlabel=key, ylabel=f"{metric} (%)", title=f"{metric} against {key} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn


def write_markdown(path: Path, body: list[list[str]], unfinished: list[Run], metric: str, dirs: Sequence[Path],
                   drawn: list[str], groups: Sequence[Group]) -> None:
    parts = [f"# Run comparison\n\nRuns under: {', '.join(map(str, dirs))}\n",
             f"Metrics in %, mean ± sample std over runs; Δ and the paired t-test on {metric}, runs matched by "
             "seed.\n", format_markdown(body), "", f"![{metric} per group](ap_bar.png)"]
    if drawn:
        parts.append("![AP at each IoU threshold](ap_per_iou.png)")
    missing = [g.name for g in groups if g.name not in drawn]
    if missing:
        parts += ["", f"Not in the AP-per-IoU figure (no eval_detail.json): {', '.join(missing)}; "
                  "`tools/evaluate.py --run RUN` writes one to RUN/eval/."]
    if unfinished:
        parts += ["", "## Unfinished or unreadable runs", ""] + [f"- `{r.path}`: {r.problem}" for r in unfinished]
    path.write_text("\n".join(parts) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare_runs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run, multirun folder, or folder of them")
    p.add_argument("--baseline", help="group to compare against (default: loss=smooth_l1 if present, else the first)")
    p.add_argument("--metric", default="AP", choices=METRICS, help="metric for the difference and the test")
    p.add_argument("--out", type=Path, help="folder for comparison.md/.csv and the figures (default: first DIR)")
    p.add_argument("--x", metavar="KEY", help="also plot the metric against this config key, one line per other "
                   "setting (e.g. --x data.noise.outliers: AP against outlier fraction, per loss)")
    return p.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    runs = [load_run(p) for p in find_runs(args.dirs)]
    done, unfinished = [r for r in runs if r.metrics], [r for r in runs if not r.metrics]
    if not done:
        raise ToolError(f"no finished runs (with metrics.json) under {', '.join(map(str, args.dirs))}"
                        f" ({len(unfinished)} unfinished)")
    groups = group_runs(done)
    for warning in seed_warnings(groups) + legacy_warnings(done):
        print(f"compare_runs.py: warning: {warning}", file=sys.stderr)
    names = [g.name for g in groups]
    wanted = args.baseline or ("loss=smooth_l1" if "loss=smooth_l1" in names else names[0])
    if wanted not in names:
        raise ToolError(f"--baseline {wanted!r} is not a group; groups: {names}")
    baseline = groups[names.index(wanted)]
    rows = compare(groups, baseline)
    body = table(rows, args.metric, wanted)
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "comparison.csv")
    drawn = plot_ap_per_iou(groups, out / "ap_per_iou.png")
    plot_bar(rows, args.metric, wanted, out / "ap_bar.png")
    write_markdown(out / "comparison.md", body, unfinished, args.metric, args.dirs, drawn, groups)
    if args.x:
        figure = out / f"{args.metric}_vs_{args.x.replace('.', '_')}.png"
        plot_against(groups, args.x, args.metric, figure)
        with (out / "comparison.md").open("a") as f:
            f.write(f"\n![{args.metric} against {args.x}]({figure.name})\n")
        print(f"wrote {figure}")
    print(format_text(body))
    for r in unfinished:
        print(f"unfinished: {r.path}: {r.problem}")
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv, ap_bar.png" + (", ap_per_iou.png" if drawn else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "compare_runs.py")


if __name__ == "__main__":
    sys.exit(main())
