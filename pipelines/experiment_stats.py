"""Statistics of an experiment: a mean over seeds with its confidence interval, and paired differences.

The interval is Student's t over seeds: with n seeds (3-5 here) the sample standard deviation s is
itself a noisy estimate, and `mean ± t_{(1+level)/2, n-1} · s / sqrt(n)` accounts for that where a
normal (z) interval would be too narrow (t_{0.975, 2} = 4.30 against z = 1.96). It assumes the
per-seed results are independent draws from one distribution, roughly normal; with so few seeds
neither a bootstrap (which cannot produce values it has not seen) nor a normality test says much
more. A comparison of two variants is paired by seed: both variants of seed s share the stages
they have in common (the same pretrained prefix), so the interval is over the per-seed differences
`a_s - b_s`, which removes the seed-to-seed spread of the shared prefix from the comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from scipy import stats

# What a comparison can expect of `a - b`, and how its interval decides it.
EXPECTATIONS = ("higher", "lower", "not_lower", "not_higher")


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its two-sided confidence interval.

    Attributes:
        mean: the sample mean.
        low: lower end of the interval (NaN with one seed: one run gives no interval).
        high: upper end.
        n: number of seeds.
        std: sample standard deviation (ddof=1; NaN with one seed).
        level: the interval's confidence level (0.95).
    """

    mean: float
    low: float
    high: float
    n: int
    std: float
    level: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def to_dict(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in asdict(self).items()}

    def format(self, digits: int = 3) -> str:
        """`0.612 ± 0.031` (or `0.612 (n=1)` without an interval)."""
        if math.isnan(self.low):
            return f"{self.mean:.{digits}f} (n={self.n})"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Student-t confidence interval for the mean of `values` (one value per seed).

    Args:
        values: per-seed results.
        level: confidence level in (0, 1).

    Returns:
        `Interval(mean, mean - h, mean + h)` with `h = t_{(1+level)/2, n-1} * s / sqrt(n)`.

    Raises:
        ValueError: no values, or `level` outside (0, 1).
    """
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be in (0, 1), got {level}")
    values = [float(v) for v in values]
    n = len(values)
    if n == 0:
        raise ValueError("a confidence interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1, math.nan, level)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, std, level)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval:
    """Interval of the mean of `a[s] - b[s]` over the seeds both have (a paired t interval).

    Raises:
        ValueError: the two share no seed.
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"no seed in common (a: {sorted(a)}, b: {sorted(b)})")
    return t_interval([a[s] - b[s] for s in common], level)


def verdict(diff: Interval, expect: str, margin: float = 0.0) -> str:
    """What the interval of `a - b` says about a claim.

    Args:
        diff: the interval of `a - b`.
        expect: "higher" (a > b), "lower" (a < b), "not_lower" (a >= b - margin), "not_higher"
            (a <= b + margin).
        margin: tolerance of the "not_*" claims, in the metric's units.

    Returns:
        "holds" (the whole interval is on the claimed side), "contradicted" (the whole interval is
        on the other side), "not shown" (the interval straddles the boundary), or "one seed" (no
        interval).
    """
    if expect not in EXPECTATIONS:
        raise ValueError(f"expect must be one of {list(EXPECTATIONS)}, got {expect!r}")
    if math.isnan(diff.low):
        return "one seed"
    if expect == "higher":
        bound, above = 0.0, True
    elif expect == "lower":
        bound, above = 0.0, False
    elif expect == "not_lower":
        bound, above = -margin, True
    else:
        bound, above = margin, False
    if (diff.low > bound) if above else (diff.high < bound):
        return "holds"
    if (diff.high < bound) if above else (diff.low > bound):
        return "contradicted"
    return "not shown"


__all__ = ["EXPECTATIONS", "Interval", "paired_difference", "t_interval", "verdict"]
