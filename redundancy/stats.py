"""The study's statistics, in one place: every interval, paired test and correction that a figure,
table, notebook or the claims table shows is computed here.

    from redundancy.stats import accuracy, compare, holm, seeded_summary
    accuracy(scores)                      # Estimate: mean, 95% interval (Wilson for 0/1 scores), n
    compare(a, b)                         # Comparison of two points on the same questions: a - b,
                                          #   paired-bootstrap interval, exact McNemar p (0/1 scores)
    holm([c1, c2, c3])                    # the same comparisons with Holm-adjusted p-values
    seeded_summary({0: s0, 1: s1}, ref)   # a seeded control: mean and spread over seeds, each seed
                                          #   against the reference (attention ranking)
    median_ratio(vanilla_ms, method_ms)   # a speedup from interleaved timing rounds

Scores are per-question values in [0, 1] (exact match: 0/1; VQA accuracy: soft), given as a
:class:`pandas.Series` indexed by question id (paired by id) or as aligned sequences.

Tests: 0/1 scores on both sides use the exact McNemar test (a two-sided binomial test on the
discordant pairs); any other paired values (soft scores, differences of differences, attention
statistics) use a two-sided sign-flip permutation test of the mean difference, exact up to
:data:`EXACT_FLIPS_UP_TO` pairs and Monte-Carlo (seeded) above. Intervals of a difference are
percentile intervals of a paired bootstrap over questions (seeded, :data:`RESAMPLES` resamples).
"""

from __future__ import annotations

import functools
import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TypeAlias

import numpy as np

if TYPE_CHECKING:  # pandas, scipy and statsmodels load when a test statistic is first computed, not at import
    import pandas as pd

LEVEL = 0.95
ALPHA = 1 - LEVEL
RESAMPLES = 10_000
SEED = 0
EXACT_FLIPS_UP_TO = 16

Scores: TypeAlias = "pd.Series | Sequence[float] | np.ndarray"


# ------------------------------------------------------------------ one point
def confidence_interval(scores: Sequence[float] | np.ndarray, level: float = LEVEL) -> tuple[float, float, str]:
    """Two-sided interval for the mean of per-sample ``scores`` in [0, 1]: ``(low, high, method)``.

    Binary scores (exact match): the Wilson score interval. Soft scores (VQA accuracy):
    the normal approximation ``mean +- z * sd / sqrt(n)``, clipped to [0, 1].
    """
    values = [float(s) for s in scores]
    n = len(values)
    if n == 0:
        return math.nan, math.nan, "none"
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    mean = sum(values) / n
    if all(s in (0.0, 1.0) for s in values):
        centre = (mean + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(mean * (1 - mean) / n + z * z / (4 * n * n))
        return max(0.0, centre - half), min(1.0, centre + half), "wilson"
    sd = statistics.stdev(values) if n > 1 else 0.0
    half = z * sd / math.sqrt(n)
    return max(0.0, mean - half), min(1.0, mean + half), "normal"


@dataclass(frozen=True)
class Estimate:
    """A mean with its two-sided interval over ``n`` questions."""

    value: float
    low: float
    high: float
    n: int
    level: float = LEVEL
    method: str = "wilson"

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """``81.7 [78.4, 84.6]`` (percent by default)."""
        f = f"{{:.{digits}f}}"
        return f"{f.format(scale * self.value)} [{f.format(scale * self.low)}, {f.format(scale * self.high)}]"


def accuracy(scores: Scores, level: float = LEVEL) -> Estimate:
    """Mean accuracy of ``scores`` with :func:`confidence_interval` and ``n``."""
    values = np.asarray(scores, float)
    low, high, method = confidence_interval(values, level)
    mean = float(values.mean()) if len(values) else math.nan
    return Estimate(mean, low, high, len(values), level, method)


# ------------------------------------------------------------------ two points
def paired(a: Scores, b: Scores) -> tuple[np.ndarray, np.ndarray]:
    """``a`` and ``b`` as aligned arrays: Series are paired by their index (question id) and must
    hold the same questions; plain sequences must have the same length."""
    import pandas as pd

    if isinstance(a, pd.Series) and isinstance(b, pd.Series):
        if a.index.has_duplicates or b.index.has_duplicates:
            raise ValueError("paired scores: a question id occurs twice")
        only_a, only_b = a.index.difference(b.index), b.index.difference(a.index)
        if len(only_a) or len(only_b):
            raise ValueError(f"paired scores: the points were evaluated on different questions "
                             f"({len(only_a)} only in the first, {len(only_b)} only in the second)")
        b = b.reindex(a.index)
    x, y = np.asarray(a, float), np.asarray(b, float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores: shapes {x.shape} and {y.shape} differ")
    if not len(x):
        raise ValueError("paired scores: no questions")
    return x, y


def median_ratio(numerator: Sequence[float] | None, denominator: Sequence[float] | None) -> float | None:
    """The median over timing rounds of ``numerator[i] / denominator[i]``, both timed in round ``i``
    back to back, so that a machine whose speed drifts from round to round cancels out of the ratio
    (the ratio of the two medians does not); None when either is missing."""
    if not numerator or not denominator:
        return None
    return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


def is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(values, (0.0, 1.0)).all())


def mcnemar(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float]:
    """Exact McNemar test of two 0/1 score vectors: ``(a right & b wrong, b right & a wrong, p)``,
    ``p`` two-sided (binomial test of the discordant pairs at 1/2; 1 when there are none)."""
    only_a = int(((a == 1) & (b == 0)).sum())
    only_b = int(((a == 0) & (b == 1)).sum())
    if only_a + only_b == 0:
        return only_a, only_b, 1.0
    from scipy.stats import binomtest

    return only_a, only_b, float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def sign_flip_test(d: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> float:
    """Two-sided p-value of mean(``d``) = 0 by flipping the signs of the paired differences:
    every flip up to :data:`EXACT_FLIPS_UP_TO` values, else ``resamples`` random ones."""
    d = np.asarray(d, float)
    observed = abs(d.mean())
    tol = 1e-12 * max(1.0, observed)
    if len(d) <= EXACT_FLIPS_UP_TO:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
        return float((np.abs((signs * d).mean(axis=1)) >= observed - tol).mean())
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 1000):
        signs = rng.choice((1.0, -1.0), size=(min(1000, resamples - start), len(d)))
        hits += int((np.abs((signs * d).mean(axis=1)) >= observed - tol).sum())
    return (hits + 1) / (resamples + 1)


def bootstrap_interval(d: np.ndarray, level: float = LEVEL, resamples: int = RESAMPLES,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of the mean of the paired differences ``d`` (questions resampled)."""
    d = np.asarray(d, float)
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):
        stop = min(resamples, start + 1000)
        means[start:stop] = d[rng.integers(0, len(d), size=(stop - start, len(d)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class Comparison:
    """Point ``a`` against point ``b`` on the same ``n`` questions: their means, the difference
    ``a - b`` with its paired-bootstrap interval, the test and its p-value (``p_holm``: adjusted
    across the family the comparison was made in, :func:`holm`)."""

    a: float
    b: float
    diff: float
    low: float
    high: float
    n: int
    p: float
    test: str
    only_a: int | None = None  # 0/1 scores: questions only `a` answers right (McNemar's discordant pairs)
    only_b: int | None = None
    level: float = LEVEL
    p_holm: float | None = None
    detectable: float | None = None  # the smallest |a - b| this n detects with 80% power (detectable_difference)

    @property
    def p_adjusted(self) -> float:
        return self.p if self.p_holm is None else self.p_holm

    def direction(self, alpha: float = ALPHA) -> int:
        """+1: ``a`` is higher at level ``alpha`` (adjusted p), -1: lower, 0: not separated."""
        if self.p_adjusted >= alpha:
            return 0
        return 1 if self.diff > 0 else -1 if self.diff < 0 else 0

    def text(self, scale: float = 100.0, digits: int = 1) -> str:
        """``-9.0 [-11.6, -6.5], McNemar p=1e-10 (Holm 3e-10)``."""
        f = f"{{:+.{digits}f}}"
        holm_text = f" (Holm {self.p_holm:.2g})" if self.p_holm is not None else ""
        return (f"{f.format(scale * self.diff)} [{f.format(scale * self.low)}, {f.format(scale * self.high)}], "
                f"{self.test} p={self.p:.2g}{holm_text}")


def compare(a: Scores, b: Scores, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED) -> Comparison:
    """Paired comparison of ``a`` and ``b`` (per-question scores of two points on the same questions):
    exact McNemar for 0/1 scores, a sign-flip permutation test otherwise; the difference's interval
    by paired bootstrap."""
    x, y = paired(a, b)
    return compare_differences(x - y, level, resamples, seed, pair=(x, y))


def compare_differences(d: Scores, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = SEED,
                        pair: tuple[np.ndarray, np.ndarray] | None = None) -> Comparison:
    """A :class:`Comparison` of paired differences ``d`` against 0 (a difference of differences, a
    statistic per question); ``pair``: the two score vectors behind ``d``, when there are two."""
    d = np.asarray(d, float)
    if not len(d):
        raise ValueError("paired differences: no questions")
    low, high = bootstrap_interval(d, level, resamples, seed)
    if pair is not None and is_binary(pair[0]) and is_binary(pair[1]):
        only_a, only_b, p = mcnemar(*pair)
        return Comparison(float(pair[0].mean()), float(pair[1].mean()), float(d.mean()), low, high, len(d), p,
                          "McNemar (exact)", only_a, only_b, level, detectable=detectable_difference(d, 1 - level))
    a, b = (float(pair[0].mean()), float(pair[1].mean())) if pair is not None else (float(d.mean()), 0.0)
    test = "sign-flip permutation" + (" (exact)" if len(d) <= EXACT_FLIPS_UP_TO else "")
    return Comparison(a, b, float(d.mean()), low, high, len(d), sign_flip_test(d, resamples, seed), test,
                      level=level, detectable=detectable_difference(d, 1 - level))


POWER = 0.8


def detectable_difference(d: Scores, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest mean paired difference that a two-sided test at ``alpha`` detects with
    probability ``power`` on ``len(d)`` questions whose per-question differences spread as ``d``
    does (one-sample t-test power, statsmodels; the sign-flip and McNemar tests behave alike at
    these n). With 0/1 scores the spread is set by the share of discordant questions: 600
    questions of which 10% are discordant detect about 3.5 points. ``nan`` below 2 questions;
    0 when every difference is the same."""
    x = np.asarray(d, float)
    if len(x) < 2:
        return math.nan
    sd = float(x.std(ddof=1))
    return 0.0 if sd == 0 else _detectable_effect(len(x), alpha, power) * sd


@functools.cache
def _detectable_effect(n: int, alpha: float, power: float) -> float:
    """The standardised effect a two-sided one-sample t-test detects at ``n``: it depends on ``n``,
    ``alpha`` and ``power`` only, so every comparison on the same questions solves it once."""
    from statsmodels.stats.power import TTestPower

    return float(TTestPower().solve_power(nobs=n, alpha=alpha, power=power, alternative="two-sided"))


def compare_groups(d1: Scores, d2: Scores, level: float = LEVEL, resamples: int = RESAMPLES,
                   seed: int = SEED) -> Comparison:
    """Mean of ``d1`` against mean of ``d2``, two independent groups of questions (e.g. a paired
    difference on the reading questions against the same difference on the colour questions):
    the interval by bootstrap within each group, the p-value by a two-sided permutation test of
    the group labels (Monte-Carlo, seeded)."""
    x, y = np.asarray(d1, float), np.asarray(d2, float)
    if not len(x) or not len(y):
        raise ValueError("group comparison: a group has no questions")
    rng = np.random.default_rng(seed)
    diffs = np.empty(resamples)
    for start in range(0, resamples, 1000):
        m = min(resamples, start + 1000) - start
        diffs[start:start + m] = (x[rng.integers(0, len(x), (m, len(x)))].mean(axis=1)
                                  - y[rng.integers(0, len(y), (m, len(y)))].mean(axis=1))
    tail = (1 - level) / 2
    low, high = (float(v) for v in np.quantile(diffs, [tail, 1 - tail]))
    observed = x.mean() - y.mean()
    pooled, hits = np.concatenate([x, y]), 0
    for start in range(0, resamples, 1000):
        m = min(resamples, start + 1000) - start
        perm = rng.permuted(np.broadcast_to(pooled, (m, len(pooled))), axis=1)
        hits += int((np.abs(perm[:, :len(x)].mean(axis=1) - perm[:, len(x):].mean(axis=1))
                     >= abs(observed) - 1e-12).sum())
    return Comparison(float(x.mean()), float(y.mean()), float(observed), low, high, len(x) + len(y),
                      (hits + 1) / (resamples + 1), "two-group permutation", level=level)


def holm(comparisons: Sequence[Comparison]) -> list[Comparison]:
    """``comparisons`` with ``p_holm`` set: Holm's step-down adjustment across the family."""
    if not comparisons:
        return []
    from statsmodels.stats.multitest import multipletests

    adjusted = multipletests([c.p for c in comparisons], method="holm")[1]
    return [replace(c, p_holm=float(p)) for c, p in zip(comparisons, adjusted)]


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of a family of tests (the bare numbers behind :func:`holm`)."""
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(p_values), method="holm")[1]] if len(p_values) else []


# ------------------------------------------------------------------ seeded controls
@dataclass(frozen=True)
class SeededSummary:
    """A seeded ranker over several seeds: the mean accuracy across seeds, its spread (sample
    standard deviation, min and max), and each seed's comparison against the reference
    (``reference - seed``, Holm-adjusted across the seeds)."""

    mean: float
    sd: float
    low: float
    high: float
    seeds: list[int]
    per_seed: list[Comparison]
    n: int

    def text(self, scale: float = 100.0) -> str:
        """``71.2 +- 1.3 (5 seeds, min 69.5, max 72.8)``; ``71.0 (1 seed)``."""
        if len(self.seeds) == 1:
            return f"{scale * self.mean:.1f} (1 seed)"
        return (f"{scale * self.mean:.1f} +- {scale * self.sd:.1f} ({len(self.seeds)} seeds, "
                f"min {scale * self.low:.1f}, max {scale * self.high:.1f})")

    def separated(self, alpha: float = ALPHA) -> int:
        """Seeds whose gap to the reference is separated from 0 (adjusted p below ``alpha``)."""
        return sum(c.direction(alpha) != 0 for c in self.per_seed)


def seeded_summary(per_seed: Mapping[int, Scores], reference: Scores, level: float = LEVEL) -> SeededSummary:
    """Summary of a seeded ranker evaluated with several seeds (``per_seed``: seed index -> scores)
    against the ``reference`` scores on the same questions (the attention ranking)."""
    if not per_seed:
        raise ValueError("seeded summary: no seeds")
    seeds = sorted(per_seed)
    means = [float(np.asarray(per_seed[s], float).mean()) for s in seeds]
    sd = statistics.stdev(means) if len(means) > 1 else math.nan
    tests = holm([compare(reference, per_seed[s], level) for s in seeds])
    n = tests[0].n
    return SeededSummary(float(np.mean(means)), sd, min(means), max(means), seeds, tests, n)
