"""Statistics of paired seed comparisons, by scipy.stats: mean ± std, the paired t-test, the confidence
interval of the mean difference, and the smallest difference a study of that size could have detected.

Seed k of every group shares initial weights and batch order, so group A's seed-k run and the baseline's are a
pair; the test is on the per-seed differences (``scipy.stats.ttest_rel``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats


def mean_std(x: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); None where undefined."""
    if not x:
        return None, None
    m = sum(x) / len(x)
    if len(x) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    return float(2 * stats.t.sf(abs(t), df))


@dataclass(frozen=True)
class Paired:
    """``x - y`` over ``n`` pairs: mean ``diff``, its confidence interval ``[lo, hi]``, the two-sided paired t-test's
    ``p``, and ``mde``: the smallest true mean difference this test detects with the given power at this n and
    the observed spread of the differences ("no significant difference" reads "none larger than mde").

    Where a statistic is undefined (no pairs, one pair, or differences without spread: a t-test divides by their
    standard deviation) it is None and ``undefined`` says why; a zero spread is never reported as certainty."""

    n: int
    diff: float | None
    lo: float | None
    hi: float | None
    p: float | None
    mde: float | None
    undefined: str | None = None


def detectable_difference(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The true mean difference a two-sided paired t-test at level ``alpha`` rejects with probability ``power``,
    for ``n`` pairs whose differences have standard deviation ``sd`` (exact, by the noncentral t). Undefined
    (ValueError) for ``sd`` 0: the test statistic divides by it."""
    if sd < 1e-12:
        raise ValueError(f"detectable difference: sd {sd!r} has no spread; the paired t-test is undefined")
    df, crit = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)

    def shortfall(delta: float) -> float:
        nc = delta * math.sqrt(n) / sd
        lower = stats.nct.cdf(-crit, df, nc)  # the far tail: scipy gives NaN where it underflows
        return stats.nct.sf(crit, df, nc) + (lower if np.isfinite(lower) else 0.0) - power

    hi = sd
    while shortfall(hi) < 0:
        hi *= 2
    return float(optimize.brentq(shortfall, 0.0, hi, xtol=1e-12 * sd))


def paired(x: Sequence[float], y: Sequence[float], confidence: float = 0.95, power: float = 0.8) -> Paired:
    """The paired comparison of ``x`` and ``y`` (same order: same seed). Every statistic is over these pairs;
    those that need a spread (interval, p, mde) are None, with the reason in ``undefined``, for fewer than 2
    pairs or differences that are all equal (to rounding)."""
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if d.size == 0:
        return Paired(0, None, None, None, None, None, "no seed in common with the baseline")
    m = float(d.mean())
    if d.size == 1:
        return Paired(1, m, None, None, None, None, "one pair: no spread to test against")
    sd = float(d.std(ddof=1))
    if sd < 1e-12:
        return Paired(d.size, m, None, None, None, None,
                      f"all {d.size} paired differences are equal ({100 * m:+.2f} points): no spread, so the "
                      "interval, p and detectable difference are undefined")
    res = stats.ttest_rel(x, y)
    ci = res.confidence_interval(confidence)
    return Paired(d.size, m, float(ci.low), float(ci.high), float(res.pvalue),
                  detectable_difference(sd, d.size, 1 - confidence, power))


def paired_t(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test of ``x - y``; None where undefined (``Paired.undefined``)."""
    return paired(x, y).p
