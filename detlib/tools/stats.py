"""Mean, sample std and the paired t-test, without scipy: Student's t through the regularised incomplete beta."""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_std(x: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1); None where undefined."""
    if not x:
        return None, None
    m = sum(x) / len(x)
    if len(x) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in x) / (len(x) - 1))


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz, Numerical Recipes 6.4)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1, a - 1
    c, d = 1.0, 1 - qab * x / qap
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((qam + 2 * m) * (a + 2 * m)),
                    -(a + m) * (qab + m) * x / ((a + 2 * m) * (qap + 2 * m))):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` for ``0 <= x <= 1``."""
    if x <= 0 or x >= 1:
        return 0.0 if x <= 0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1 - math.exp(log_front) * _betacf(b, a, 1 - x) / b


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom."""
    if math.isinf(t):
        return 0.0
    return betainc(df / 2, 0.5, df / (df + t * t))


def paired_t(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test of ``x - y``; None for fewer than 2 pairs."""
    d = [a - b for a, b in zip(x, y)]
    m, s = mean_std(d)
    if s is None:
        return None
    if s == 0:
        return 1.0 if m == 0 else 0.0
    return t_pvalue(m / (s / math.sqrt(len(d))), len(d) - 1)
