"""Seeds to conclusions: the mean of a score over seeds with its 95 % interval, and a paired comparison of
two methods run on the same seeds.

Both use Student's t distribution with n - 1 degrees of freedom. With the 3 to 10 seeds a study affords,
the normal approximation would make the intervals far too narrow (t at 2 degrees of freedom is 4.30, not
1.96). The t distribution's CDF is computed in closed form for integer degrees of freedom (Abramowitz and
Stegun 26.7.3 and 26.7.4: a finite series in cos(theta), theta = atan(t / sqrt(df))), and its quantile by
bisection on that CDF, so no scipy dependency comes in for two functions.

A paired comparison is a t-test on the per-seed differences: seed s of method A and seed s of method B saw
the same world, sampling seed and base model, so what varies with the seed cancels in the difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (a positive integer) degrees of freedom."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    t = abs(t)
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    cos2, sin = math.cos(theta) ** 2, math.sin(theta)
    if df % 2 == 1:  # A&S 26.7.3
        if df == 1:
            return 2 * theta / math.pi
        term, total = math.cos(theta), math.cos(theta)
        for k in range(3, df - 1, 2):  # terms cos^3 ... cos^(df-2), each the last times (k-1)/k cos^2
            term *= (k - 1) / k * cos2
            total += term
        return 2 / math.pi * (theta + sin * total)
    term, total = 1.0, 1.0  # A&S 26.7.4
    for k in range(2, df - 1, 2):  # terms cos^2 ... cos^(df-2), each the last times (k-1)/k cos^2
        term *= (k - 1) / k * cos2
        total += term
    return sin * total


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 < p < 1) of Student's t with `df` degrees of freedom (e.g. p=0.975: the 95 %
    two-sided critical value)."""
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p}")
    target = 2 * p - 1  # P(|T| <= t) = 2p - 1
    low, high = 0.0, 1.0
    while t_two_sided_mass(high, df) < target:
        high *= 2
    for _ in range(200):  # bisection to float precision
        mid = (low + high) / 2
        if t_two_sided_mass(mid, df) < target:
            low = mid
        else:
            high = mid
        if high - low < 1e-12 * max(1.0, high):
            break
    return (low + high) / 2


@dataclass(frozen=True)
class Interval:
    """Mean of n values with the half-width of its two-sided confidence interval (mean +- half_width)."""

    mean: float
    half_width: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean and t-interval of `values` (one per seed); one value: half-width nan (no spread to estimate)."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to average")
    mean = sum(values) / n
    if n == 1:
        return Interval(mean, math.nan, 1)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class PairedComparison:
    """A - B on the same seeds: the mean difference, its interval, the t statistic and two-sided p-value."""

    difference: Interval
    t: float
    p_value: float

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p_value < alpha


def paired_comparison(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> PairedComparison:
    """Paired t-test of a[i] - b[i] (seed i of both methods). Needs at least two seeds.

    Identical differences (zero spread) give p = 0 when they are not zero and p = 1 when they are.
    """
    if len(a) != len(b):
        raise ValueError(f"paired values differ in number: {len(a)} and {len(b)} (one per seed each)")
    if len(a) < 2:
        raise ValueError("a paired comparison needs at least two seeds")
    differences = [x - y for x, y in zip(a, b)]
    interval = mean_interval(differences, confidence)
    n = len(differences)
    sd = math.sqrt(sum((d - interval.mean) ** 2 for d in differences) / (n - 1))
    if sd == 0:
        return PairedComparison(interval, math.copysign(math.inf, interval.mean) if interval.mean else 0.0,
                                0.0 if interval.mean else 1.0)
    t = interval.mean / (sd / math.sqrt(n))
    return PairedComparison(interval, t, 1 - t_two_sided_mass(t, n - 1))
