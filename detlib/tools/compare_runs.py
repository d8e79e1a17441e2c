"""Compare finished runs: mean ± std over seeds; against a baseline, the paired difference with its 95 % CI,
p-value and the smallest difference the study could detect; AP vs IoU.

    uv run tools/compare_runs.py multirun/2026-01-01/12-00-00                 # one sweep
    uv run tools/compare_runs.py /work/sweeps --baseline loss=smooth_l1 --out report/
    uv run tools/compare_runs.py SWEEP_A SWEEP_B --x data.noise.outliers   # + AP against the outlier fraction

Every folder under the DIRs with a ``run.json`` is a run (a multirun folder, a single run, or a folder
of sweeps all work). A run's set-up is read from its ``run.json``, written once when it started, never from Hydra's ``.hydra`` files (a later launch
in the folder rewrites those). Runs whose identity (``detlib.runs.record.comparison_identity``: the config minus
the keys that don't change results, plus world size and a fingerprint of the annotation files, plus
the inference settings its metrics were computed with) is equal except for the seed form a group, so runs on different data never share one;
named by the overrides that tell the groups apart (``loss=huber``); a key overridden in one sweep
and left at its default in another is named in both (``loss=l2,data.noise.outliers=0.0``), so
sweeps run at different times combine. A key that only some runs have, with one value wherever it
appears (added to a config file since), is left out. A run without ``metrics.json``
is listed as unfinished. Differences from the baseline are tested by a paired t-test on the runs
matched by seed (runs of one seed in one group are averaged first; seed k of every group shares initial
weights and batch order): mean difference, its 95 % confidence interval, the p-value, and the
minimum detectable difference (MDE: the true difference this test finds with 80 % power at that n
and the observed spread), so "not significant" reads "no difference larger than the MDE".

Beside the between-seed CI, the val-sampling CI of each paired difference: a paired bootstrap over val images
(``--bootstrap N`` resamples, 0: off) of each run's ``detections.json``, with which of the two dominates, and the
variance of a pair's difference split into val sampling, seeds and floating-point chaos (same-seed reruns, e.g.
``trainer.num_threads=1``); ``detlib.evaluation.val_sampling``.

Writes ``comparison.md``, ``comparison.csv``, ``ap_per_iou.png`` and ``ap_bar.png`` into ``--out``; with
TIDE data in the runs' ``eval_detail.json``, also the error decomposition per group (``tide.png``,
``tp_iou.png``; ``detlib.tools.compare_errors``).
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from detlib import runs
from detlib.evaluation.stats import mean_std, paired
from detlib.evaluation.val_sampling import ReplicateCache, decompose, decompose_table, val_rows, val_table
from detlib.runs.groups import Group, group_runs, seed_warnings
from detlib.runs.results import Run, find_runs, load_run, reconcile_diverged
from detlib.tools.cli import ToolError, cli, prog_name
from detlib.tools.compare_errors import error_rows, error_table, errors_section
from detlib.tools.compare_plots import plot_against, plot_ap_per_iou, plot_bar

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def unpaired_seeds(group: dict[int, float], baseline: dict[int, float]) -> str:
    """The seeds of one side without a partner on the other, named (``""`` when every seed pairs)."""
    only_g, only_b = sorted(set(group) - set(baseline)), sorted(set(baseline) - set(group))
    parts = ([f"seeds {' '.join(map(str, only_g))} only here"] if only_g else []) + \
        ([f"seeds {' '.join(map(str, only_b))} only in the baseline"] if only_b else [])
    return "; ".join(parts)


def compare(groups: Sequence[Group], baseline: Group) -> list[dict]:
    """One row per group: n, seeds, mean/std per metric; against the baseline, over the seeds both have (the
    same pairs for every number): the mean paired difference, its CI, p, detectable difference, the number of
    pairs, the seeds left unpaired and why a statistic is undefined (``{m}_undefined``)."""
    rows = []
    for g in groups:
        row: dict = {"group": g.name, "n": len(g.runs), "seeds": sorted({r.seed for r in g.runs})}
        for m in METRICS:
            row[m], row[f"{m}_std"] = mean_std(g.values(m))
            a, b = g.by_seed(m), baseline.by_seed(m)
            common = sorted(set(a) & set(b))
            test = None if g is baseline else paired([a[s] for s in common], [b[s] for s in common])
            for key in ("diff", "ci_lo", "ci_hi", "p", "mde", "undefined"):
                row[f"{m}_{key}"] = None
            if test is not None:
                row[f"{m}_diff"], row[f"{m}_ci_lo"], row[f"{m}_ci_hi"] = test.diff, test.lo, test.hi
                row[f"{m}_p"], row[f"{m}_mde"], row[f"{m}_undefined"] = test.p, test.mde, test.undefined
            row[f"{m}_pairs"] = len(common)
            row[f"{m}_unpaired"] = "" if g is baseline else unpaired_seeds(a, b)
        rows.append(row)
    return rows


def _pct(v: float | None, sign: bool = False) -> str:
    return "n/a" if v is None else (f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}")


def _p(v: float | None, undefined: str | None = None) -> str:
    return ("undefined" if undefined else "n/a") if v is None else f"{v:.3g}"


def table(rows: list[dict], metric: str, baseline: str) -> list[list[str]]:
    """Header and formatted cells (AP in %, mean ± std)."""
    head = ["group", "n"] + list(METRICS) + [f"Δ{metric} vs {baseline} (paired)", "p (paired t)", "pairs",
                                            "95% CI", "detectable (80% power)", "note"]
    body = [head]
    for r in rows:
        cells = [r["group"], str(r["n"])]
        for m in METRICS:
            std = r[f"{m}_std"]
            cells.append(_pct(r[m]) + ("" if std is None else f" ± {_pct(std)}"))
        is_base = r["group"] == baseline
        lo, hi, mde = r[f"{metric}_ci_lo"], r[f"{metric}_ci_hi"], r[f"{metric}_mde"]
        why = r[f"{metric}_undefined"]
        missing = "undefined" if why else "n/a"
        ci = missing if lo is None else f"[{_pct(lo, sign=True)}, {_pct(hi, sign=True)}]"
        note = "; ".join(x for x in (r[f"{metric}_unpaired"], why) if x)
        cells += ["baseline" if is_base else _pct(r[f"{metric}_diff"], sign=True),
                  "" if is_base else _p(r[f"{metric}_p"], why), "" if is_base else str(r[f"{metric}_pairs"]),
                  "" if is_base else ci, "" if is_base else (missing if mde is None else f"±{_pct(mde)}"),
                  "" if is_base else note]
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
    cols = ["group", "n", "seeds"] + [f"{m}{s}" for m in METRICS
                                      for s in ("", "_std", "_diff", "_ci_lo", "_ci_hi", "_p", "_mde", "_pairs", "_unpaired",
                                                "_undefined")]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            w.writerow(["" if r[c] is None else (" ".join(map(str, r[c])) if c == "seeds" else r[c]) for c in cols])


def write_markdown(path: Path, body: list[list[str]], unfinished: list[Run], metric: str, dirs: Sequence[Path],
                   drawn: list[str], groups: Sequence[Group]) -> None:
    parts = [f"# Run comparison\n\nRuns under: {', '.join(map(str, dirs))}\n",
             f"Metrics in %, mean ± sample std over runs. Against the baseline, on {metric}, over the seeds both "
             "groups have (every number over the same pairs; seeds without a partner are named in the note): "
             "Δ (the mean paired difference), its 95 % confidence interval, the paired t-test's p, and the smallest "
             "true difference the test detects with 80 % power at this n and spread (a non-significant Δ means: no "
             "difference larger than that, at 80 % power). Where the differences have no spread (or there is one "
             "pair) these are undefined, and the note says why.\n", format_markdown(body), "", f"![{metric} per group](ap_bar.png)"]
    if drawn:
        parts.append("![AP at each IoU threshold](ap_per_iou.png)")
    missing = [g.name for g in groups if g.name not in drawn]
    if missing:
        parts += ["", f"Not in the AP-per-IoU figure (no {runs.EVAL_DETAIL}): {', '.join(missing)}; "
                  "`tools/evaluate.py --run RUN` writes one to RUN/eval/."]
    diverged = [r for g in groups for r in g.runs if r.diverged]
    if diverged:
        parts += ["", "## Diverged runs (non-finite loss; scored as no detections: AP 0, null where the "
                      "val set has no such objects)", ""] + [
            f"- `{r.path}`: {r.diverged}" for r in diverged]
    if unfinished:
        parts += ["", "## Unfinished or unreadable runs", ""] + [f"- `{r.path}`: {r.problem}" for r in unfinished]
    path.write_text("\n".join(parts) + "\n")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog_name("compare_runs.py"), description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="run, multirun folder, or folder of them")
    p.add_argument("--baseline", help="group to compare against (default: loss=smooth_l1 if present, else the first)")
    p.add_argument("--metric", default="AP", choices=METRICS, help="metric for the difference and the test")
    p.add_argument("--out", type=Path, help="folder for comparison.md/.csv and the figures (default: first DIR)")
    p.add_argument("--x", metavar="KEY", help="also plot the metric against this config key, one line per other "
                   "setting (e.g. --x data.noise.outliers: AP against outlier fraction, per loss)")
    p.add_argument("--bootstrap", type=int, default=500, metavar="N",
                   help="val-sampling CIs from N paired bootstrap resamples of the val images (AP, AP50, AP75; "
                        "about 10 ms per run and resample on 300 images); 0: off (default: 500)")
    p.add_argument("--bootstrap-seed", type=int, default=0, help="seed of the resamples (default: 0)")
    return p.parse_args(argv)


def val_sampling_section(groups: Sequence[Group], baseline: Group, rows: list[dict], metric: str, n_boot: int,
                         seed: int) -> tuple[str, str]:
    """The markdown section and the printed text of the val-sampling CIs and the variance decomposition."""
    cache = ReplicateCache(metric, n_boot, seed)
    vbody = val_table(val_rows(groups, baseline, rows, cache), metric, baseline.name)
    dbody = decompose_table(decompose(groups, baseline, cache), metric)
    if not any(v is not None for v in cache.done.values()):
        note = (f"no val-sampling CIs: no run has its detections ({runs.DETECTIONS}; for a run made before detlib "
                f"kept them, tools/evaluate.py --run RUN writes RUN/{runs.EVAL_DIR}/{runs.DETECTIONS})")
        return f"\n{note[0].upper()}{note[1:]}.\n", f"\n{note}"
    notes = "".join(f"\n- {p}" for p in cache.problems)
    md = (f"\n## Val-sampling uncertainty ({n_boot} paired bootstrap resamples of the val images)\n\n"
          "The seed CI (above) is the spread over training seeds on this val set; the val-sampling CI is how far the "
          "difference moves on another val set of the same size (images drawn with replacement, the same draws for "
          "every run). Whichever is wider limits what the study can resolve.\n\n" + format_markdown(vbody)
          + "\n\nThe variance of one pair's difference, as SDs in points: val sampling (bootstrap), seeds (the "
          "spread of the pairs' differences less the chaos part) and floating-point chaos (2× the variance between "
          "same-seed reruns of one set-up).\n\n" + format_markdown(dbody) + "\n"
          + (f"\nLeft out of the bootstrap:{notes}\n" if notes else ""))
    text = ("\nVal-sampling CI (paired bootstrap over val images) beside the seed CI:\n" + format_text(vbody)
            + "\n\nVariance of a pair's difference (SD in points):\n" + format_text(dbody)
            + "".join(f"\nbootstrap: {p}" for p in cache.problems))
    return md, text


def _groups_and_baseline(dirs: Sequence[Path], wanted: str | None) -> tuple[list[Group], Group, list[Run]]:
    """The finished runs' groups, the baseline group and the unfinished runs; warnings go to stderr."""
    found = [load_run(p) for p in find_runs(dirs)]
    done, unfinished = [r for r in found if r.metrics], [r for r in found if not r.metrics]
    if not done:
        raise ToolError(f"no finished runs (with {runs.METRICS}) under {', '.join(map(str, dirs))}"
                        f" ({len(unfinished)} unfinished)")
    reconcile_diverged(done)
    groups = group_runs(done)
    for warning in seed_warnings(groups):
        print(f"{prog_name('compare_runs.py')}: warning: {warning}", file=sys.stderr)
    names = [_pairs(g.name) for g in groups]
    wanted = wanted or ("loss=smooth_l1" if _pairs("loss=smooth_l1") in names else groups[0].name)
    if _pairs(wanted) not in names:
        raise ToolError(f"--baseline {wanted!r} is not a group; groups: {[g.name for g in groups]}")
    return groups, groups[names.index(_pairs(wanted))], unfinished


def _pairs(name: str) -> frozenset[str]:
    """A group name's ``key=value`` pairs, in any order (a comma inside a value, ``steps=[0.5,0.8]``, stays)."""
    return frozenset(p.strip() for p in re.split(r",(?=[^,=\[\]]+=)", name))


def run(argv: Sequence[str] | None = None) -> int:
    """The comparison of the runs under ``argv``'s DIRs: print the table, write the report files.
    Raises ``ToolError`` (and the other ``cli.user_errors()``) on bad input."""
    args = parse_args(argv)
    groups, baseline, unfinished = _groups_and_baseline(args.dirs, args.baseline)
    rows = compare(groups, baseline)
    body = table(rows, args.metric, baseline.name)
    out = args.out or args.dirs[0]
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "comparison.csv")
    drawn = plot_ap_per_iou(groups, out / "ap_per_iou.png")
    plot_bar(rows, args.metric, baseline.name, out / "ap_bar.png")
    write_markdown(out / "comparison.md", body, unfinished, args.metric, args.dirs, drawn, groups)
    errors = errors_section(groups, out, format_markdown)
    if errors:
        with (out / "comparison.md").open("a") as f:
            f.write(errors)
    sampling = None
    if args.bootstrap > 0 and args.metric in ("AP", "AP50", "AP75"):
        sampling = val_sampling_section(groups, baseline, rows, args.metric, args.bootstrap, args.bootstrap_seed)
        with (out / "comparison.md").open("a") as f:
            f.write(sampling[0])
    if args.x:
        figure = out / f"{args.metric}_vs_{args.x.replace('.', '_')}.png"
        plot_against(groups, args.x, args.metric, figure)
        with (out / "comparison.md").open("a") as f:
            f.write(f"\n![{args.metric} against {args.x}]({figure.name})\n")
        print(f"wrote {figure}")
    print(format_text(body))
    if errors:
        print("\nTIDE (AP points lost to each error type; TP IoU in %), mean ± 95% CI:")
        print(format_text(error_table(error_rows(groups))))
    if sampling:
        print(sampling[1])
    for r in unfinished:
        print(f"unfinished: {r.path}: {r.problem}")
    print(f"\nwrote {out / 'comparison.md'}, comparison.csv, ap_bar.png" + (", ap_per_iou.png" if drawn else "")
          + (", tide.png, tp_iou.png" if errors else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return cli(run, argv, "compare_runs.py")
