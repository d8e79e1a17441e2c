"""Paired-seed statistics of compare_runs: confidence interval and detectable difference, on fixed data,
against textbook formulas and a simulation of the test itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from detlib.evaluation import stats

X = [0.612, 0.655, 0.641, 0.630, 0.668]  # five paired seeds (AP)
Y = [0.600, 0.649, 0.617, 0.633, 0.650]


def test_interval_and_p_by_the_textbook_formula():
    d = np.array(X) - np.array(Y)
    n, m, s = d.size, d.mean(), d.std(ddof=1)
    half = sps.t.ppf(0.975, n - 1) * s / math.sqrt(n)
    r = stats.paired(X, Y)
    assert (r.n, r.diff) == (5, pytest.approx(m))
    assert (r.lo, r.hi) == (pytest.approx(m - half), pytest.approx(m + half))
    t = m / (s / math.sqrt(n))
    assert r.p == pytest.approx(2 * sps.t.sf(abs(t), n - 1))
    assert (r.p < 0.05) == (r.lo > 0 or r.hi < 0)  # the interval excludes 0 exactly when p < 0.05


def test_detectable_difference_has_the_stated_power():
    sd, n = 0.01, 5
    mde = stats.detectable_difference(sd, n)
    # Simulate the paired t-test at a true difference of mde: it rejects 80 % of the time.
    rng = np.random.default_rng(0)
    d = rng.normal(mde, sd, size=(40000, n))
    p = sps.ttest_1samp(d, 0.0, axis=1).pvalue
    assert (p < 0.05).mean() == pytest.approx(0.8, abs=0.01)
    # Larger than the normal approximation (z + z) sd / sqrt(n) at small n, equal to it at large n.
    z = (sps.norm.ppf(0.975) + sps.norm.ppf(0.8)) * sd
    assert mde > z / math.sqrt(n)
    assert stats.detectable_difference(sd, 2000) == pytest.approx(z / math.sqrt(2000), rel=2e-3)
    assert stats.detectable_difference(sd, 2) > 0  # one degree of freedom: scipy's far tail is NaN, handled


def test_zero_spread_of_paired_differences_is_undefined_not_certain():
    same = stats.paired([0.5, 0.6], [0.4, 0.5])  # every pair differs by 0.1: no spread, the t statistic is 0/0
    assert same.n == 2 and same.diff == pytest.approx(0.1)
    assert (same.lo, same.hi, same.p, same.mde) == (None, None, None, None)  # never p 0, never ±0
    assert "no spread" in same.undefined and "+10.00 points" in same.undefined
    assert stats.paired([0.5, 0.6], [0.5, 0.6]).p is None  # equal runs: not "p 1" either
    with pytest.raises(ValueError, match="no spread"):
        stats.detectable_difference(0.0, 5)


def test_one_pair_or_none_gives_the_difference_and_says_why_the_rest_is_undefined():
    one = stats.paired([0.5], [0.4])
    assert one.diff == pytest.approx(0.1) and one.p is None and "one pair" in one.undefined
    none = stats.paired([], [])
    assert none.n == 0 and none.diff is None and "no seed in common" in none.undefined
