"""Group runs that differ only in the seed, and name each group by what tells it apart (``loss=huber``).

Runs whose identity (``detlib.runs.record.comparison_identity``: the config minus execution keys, plus world size and a
fingerprint of the annotation files, plus the inference settings of their metrics: ``score_thresh``,
``detections_per_img``, ...) is equal except for the seed form a group, so runs on different
data never share one. A key that only some runs have, with one value wherever it appears (added to a
config file since), is left out. A key overridden in one sweep and left at its default in another is
named in both (``loss=l2,data.noise.outliers=0.0``), so sweeps run at different times combine.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from detlib.runs.results import Run


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


def _override_values(run: Run, keys: Sequence[str]) -> dict[str, str | None]:
    """The run's value of each overridden ``key``: its own override, else what the run used without one
    (the config value, or the config group's choice its run.json records); None if unknown."""
    given = {k.lstrip("+"): v for k, _, v in (o.partition("=") for o in run.overrides) if _}
    return {k: given[k] if k in given else str(run.identity[k]) if k in run.identity else run.choices.get(k)
            for k in keys}


def _short(value: object) -> object:
    """Data fingerprints (64 hex digits) named by their first 8."""
    return f"{value[:8]}…" if isinstance(value, str) and len(value) == 64 else value


def _name_groups(groups: list[Group]) -> None:
    """Name each group by the overrides that tell it apart (``loss=huber``), a key overridden in one sweep
    and left at its default in another named in both. Falls back to the differing config keys."""
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
