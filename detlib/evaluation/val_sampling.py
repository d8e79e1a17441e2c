"""How much of a paired AP difference is the val sample: a paired bootstrap over val images, beside the seed CI.

The between-seed CI (``detlib.evaluation.stats.paired``) says how the difference varies with training randomness,
on this val set. Another val set of the same size would move every run's AP too; ``val_rows`` draws such sets
(images with replacement, the same draws for every run: ``detlib.evaluation.bootstrap``) from each run's
``detections.json`` (the trainer writes it; older runs: ``tools/evaluate.py --run RUN`` writes
``RUN/eval/detections.json``) and the val annotations its ``run.json`` names. Per group against the baseline,
over the seeds both have: the val-sampling 95 % CI of the mean paired difference and of each pair's, and which
half-width is larger ("dominates"). ``decompose`` splits a difference's variance into val sampling, seeds and
floating-point chaos (same-seed reruns: the runs of one seed in one group, e.g. another ``trainer.num_threads``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detlib import runs
from detlib.evaluation.bootstrap import METRICS, image_evaluations, percentile_ci, resampled_ap, resamples
from detlib.runs import DETECTIONS, EVAL_DETAIL, EVAL_DIR
from detlib.runs.groups import Group
from detlib.runs.results import Run


@dataclass
class Replicates:
    """One run's metric on every bootstrap resample of the val images, and on the val set itself."""

    full: float
    boot: np.ndarray  # (n_boot,)


def _detections(run: Run) -> Path | None:
    """The detections its metrics were computed from: the trainer's, else ``tools/evaluate.py``'s of the same AP."""
    if (run.path / DETECTIONS).is_file():
        return run.path / DETECTIONS
    later = run.path / EVAL_DIR / DETECTIONS
    try:
        detail = json.loads((run.path / EVAL_DIR / EVAL_DETAIL).read_text())
    except (OSError, ValueError):
        return None
    ap = (run.metrics or {}).get("AP")
    same = ap is not None and abs(((detail.get("stats") or {}).get("AP") or math.nan) - ap) < 1e-9
    return later if later.is_file() and same else None


class ReplicateCache:
    """Each run's ``Replicates`` for one metric, computed once (the baseline is in every pair); all on the same
    resamples (one ``seed``; runs on the same val annotations draw the same images)."""

    def __init__(self, metric: str = "AP", n_boot: int = 500, seed: int = 0) -> None:
        if metric not in METRICS:
            raise ValueError(f"the val-sampling bootstrap covers {', '.join(METRICS)}, not {metric}")
        self.metric, self.n_boot, self.seed = metric, n_boot, seed
        self.done: dict[Path, Replicates | None] = {}
        self.gts: dict[str, object] = {}
        self.problems: list[str] = []

    def _gt(self, path: str):
        from detlib.data.coco_files import coco_from_dict, load_coco_json
        from detlib.data.validation import evaluation_ground_truth

        if path not in self.gts:
            data, _ = evaluation_ground_truth(load_coco_json(Path(path)), Path(path))
            self.gts[path] = coco_from_dict(data)
        return self.gts[path]

    def get(self, run: Run) -> Replicates | None:
        if run.path not in self.done:
            self.done[run.path] = self._compute(run)
        return self.done[run.path]

    def _compute(self, run: Run) -> Replicates | None:
        dets = _detections(run)
        val = (run.record.get("data_files") or {}).get("val")
        if dets is None or not val or not Path(val).is_file():
            self.problems.append(f"{run.path}: " + (f"no {DETECTIONS}" if dets is None else
                                                    f"val annotations not found ({val})"))
            return None
        E = image_evaluations(self._gt(val), json.loads(dets.read_text()), int(_max_det(run)))
        full = resampled_ap(E)[self.metric]
        recorded = (run.metrics or {}).get(self.metric)
        if full is None or recorded is None or abs(full - recorded) > 1e-6:
            self.problems.append(f"{run.path}: {self.metric} from its detections ({full}) is not its {runs.METRICS}'s "
                                 f"({recorded}); left out")
            return None
        boot = np.array([v if (v := resampled_ap(E, idx)[self.metric]) is not None else np.nan
                         for idx in resamples(len(E.params.imgIds), self.n_boot, self.seed)])
        return Replicates(full, boot)

    def by_seed(self, group: Group) -> dict[int, Replicates]:
        """Per seed, the replicates averaged over that seed's runs (as ``Group.by_seed`` averages the metric)."""
        seeds: dict[int, list[Replicates]] = {}
        for r in group.runs:
            rep = self.get(r)
            if rep is not None:
                seeds.setdefault(r.seed, []).append(rep)
        return {s: Replicates(float(np.mean([x.full for x in v])), np.mean([x.boot for x in v], axis=0))
                for s, v in seeds.items()}


def _max_det(run: Run) -> int:
    dets = run.identity.get("eval.max_dets")
    return dets[-1] if isinstance(dets, list) and dets else 100


def val_rows(groups: Sequence[Group], baseline: Group, rows: Sequence[dict], cache: ReplicateCache) -> list[dict]:
    """Per group but the baseline: pairs, Δ, the seed CI's half-width (from ``rows``, ``compare``'s), the
    val-sampling CI of the mean Δ and its half-width, each pair's ``(seed, Δ, lo, hi)`` and which dominates."""
    m, base, out = cache.metric, cache.by_seed(baseline), []
    by_name = {r["group"]: r for r in rows}
    for g in groups:
        if g is baseline:
            continue
        mine = cache.by_seed(g)
        common = sorted(set(mine) & set(base))
        row = {"group": g.name, "pairs": len(common), "diff": None, "val_lo": None, "val_hi": None,
               "val_half": None, "seed_half": None, "per_pair": [], "dominates": None}
        if common:
            d = np.array([mine[s].boot - base[s].boot for s in common])  # (pairs, n_boot)
            row["diff"] = float(np.mean([mine[s].full - base[s].full for s in common]))
            row["val_lo"], row["val_hi"] = percentile_ci(d.mean(0))
            row["val_half"] = (row["val_hi"] - row["val_lo"]) / 2
            row["per_pair"] = [(s, mine[s].full - base[s].full, *percentile_ci(d[i])) for i, s in enumerate(common)]
            r = by_name.get(g.name, {})
            if r.get(f"{m}_ci_lo") is not None:
                row["seed_half"] = (r[f"{m}_ci_hi"] - r[f"{m}_ci_lo"]) / 2
                row["dominates"] = "seeds" if row["seed_half"] > row["val_half"] else "val sampling"
        out.append(row)
    return out


def _pct(v: float | None, sign: bool = False) -> str:
    return "n/a" if v is None else (f"{100 * v:+.2f}" if sign else f"{100 * v:.2f}")


def val_table(vrows: Sequence[dict], metric: str, baseline: str) -> list[list[str]]:
    head = ["group", "pairs", f"Δ{metric} vs {baseline}", "seed 95% CI ±", "val-sampling 95% CI", "val ±",
            "dominates", "per pair (seed: Δ [val CI])"]
    body = [head]
    for r in vrows:
        ci = "n/a" if r["val_lo"] is None else f"[{_pct(r['val_lo'], True)}, {_pct(r['val_hi'], True)}]"
        pairs = "; ".join(f"{s}: {_pct(d, True)} [{_pct(lo, True)}, {_pct(hi, True)}]" for s, d, lo, hi in r["per_pair"])
        body.append([r["group"], str(r["pairs"]), _pct(r["diff"], True),
                     "undefined" if r["seed_half"] is None else f"±{_pct(r['seed_half'])}", ci,
                     "n/a" if r["val_half"] is None else f"±{_pct(r['val_half'])}", r["dominates"] or "n/a", pairs])
    return body


def chaos_variance(groups: Sequence[Group], metric: str) -> tuple[float | None, int]:
    """The pooled variance of ``metric`` between runs of the same seed in the same group (same set-up, same
    seed: reruns that differ in an execution key, e.g. ``trainer.num_threads``), and its degrees of freedom;
    None without such reruns."""
    ss, df = 0.0, 0
    for g in groups:
        seeds: dict[int, list[float]] = {}
        for r in g.runs:
            if r.metrics.get(metric) is not None:
                seeds.setdefault(r.seed, []).append(r.metrics[metric])
        for v in seeds.values():
            if len(v) > 1:
                ss += float(np.sum((np.asarray(v) - np.mean(v)) ** 2))
                df += len(v) - 1
    return (ss / df if df else None), df


def decompose(groups: Sequence[Group], baseline: Group, cache: ReplicateCache) -> list[dict]:
    """Per group against the baseline: the variance of one seed pair's difference Δ split three ways, as
    variances (fractions², AP/100 squared):

    * ``val``: the finite val sample, the bootstrap variance of Δ over val images, averaged over the pairs;
    * ``chaos``: floating-point chaos, ``2 σ²`` with σ² the pooled variance between same-seed reruns
      (``chaos_variance``; Δ is a difference of two runs, each with its own chaos);
    * ``seed``: training randomness (initial weights, batch order) beyond that: the variance of Δ across
      seeds minus ``chaos`` (clipped at 0; with one pair: None).

    ``val`` is not part of the seed spread (every run is scored on the same val images): it is the extra
    uncertainty of generalising from this val set to the images it was drawn from."""
    chaos_run, chaos_df = chaos_variance(groups, cache.metric)
    chaos = None if chaos_run is None else 2 * chaos_run
    base, out = cache.by_seed(baseline), []
    for g in groups:
        if g is baseline:
            continue
        mine = cache.by_seed(g)
        common = sorted(set(mine) & set(base))
        d_full = np.array([mine[s].full - base[s].full for s in common])
        val = float(np.mean([np.nanvar(mine[s].boot - base[s].boot, ddof=1) for s in common])) if common else None
        total = float(np.var(d_full, ddof=1)) if len(common) > 1 else None
        seed = None if total is None else max(total - (chaos or 0.0), 0.0)
        out.append({"group": g.name, "pairs": len(common), "val": val, "seed": seed, "chaos": chaos,
                    "chaos_df": chaos_df, "seed_total": total})
    return out


def decompose_table(drows: Sequence[dict], metric: str) -> list[list[str]]:
    """SDs in AP points (the square root of each variance) and each one's share of their sum."""
    head = ["group", "pairs", f"val sampling SD ({metric})", "seed SD", "chaos SD (same-seed reruns)",
            "shares val / seed / chaos"]
    body = [head]
    for r in drows:
        parts = [r["val"], r["seed"], r["chaos"]]
        total = sum(p for p in parts if p is not None)
        share = " / ".join("n/a" if p is None else f"{100 * p / total:.0f} %" for p in parts) \
            if total and r["seed"] is not None else "n/a (needs 2+ pairs)"
        sd = ["n/a" if p is None else f"{100 * math.sqrt(p):.2f}" for p in parts]
        if r["chaos"] is not None:
            sd[2] += f" (df {r['chaos_df']})"
        body.append([r["group"], str(r["pairs"]), *sd, share])
    return body
