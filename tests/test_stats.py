"""The study's statistics (redundancy/stats.py): intervals, paired tests, Holm, seeded controls."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from redundancy.stats import (
    accuracy,
    compare,
    compare_differences,
    compare_groups,
    confidence_interval,
    holm,
    holm_adjust,
    mcnemar,
    paired,
    seeded_summary,
    sign_flip_test,
)


def test_wilson_interval_closed_form() -> None:
    # 5 of 10 correct: Wilson 95% interval 0.5 -+ 0.2634 (centre stays 0.5 at p = 0.5)
    low, high, method = confidence_interval([1.0] * 5 + [0.0] * 5)
    assert method == "wilson"
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high, _ = confidence_interval([1.0] * 20)
    assert high == 1.0 and low == pytest.approx(20 / (20 + 1.959964**2), abs=1e-4)


def test_soft_scores_use_normal_interval() -> None:
    scores = [1.0, 0.6, 0.3, 0.0, 0.9, 1.0]
    low, high, method = confidence_interval(scores)
    mean = sum(scores) / len(scores)  # 0.6333, sample sd sqrt(0.85333 / 5) = 0.413118
    assert method == "normal" and low < mean < high and 0.0 <= low and high <= 1.0
    assert (high - low) / 2 == pytest.approx(1.959964 * 0.413118 / len(scores) ** 0.5, rel=1e-3)


def test_accuracy_estimate_states_n_and_prints_percent() -> None:
    est = accuracy(pd.Series([1.0] * 490 + [0.0] * 110))
    assert est.n == 600 and est.value == pytest.approx(490 / 600) and est.method == "wilson"
    assert est.text() == "81.7 [78.4, 84.6]"  # centre 0.8147, half-width 0.0309


def test_mcnemar_exact_counts_only_the_discordant_pairs() -> None:
    # 10 discordant pairs, 9 for a: two-sided binomial p = 2 * (C(10,9) + C(10,10)) / 2**10 = 22/1024
    a = np.array([1] * 9 + [0] + [1] * 50 + [0] * 40, float)
    b = np.array([0] * 9 + [1] + [1] * 50 + [0] * 40, float)
    assert mcnemar(a, b) == (9, 1, pytest.approx(22 / 1024))
    assert mcnemar(a, a)[2] == 1.0


def test_compare_pairs_by_question_id_and_refuses_other_questions() -> None:
    a = pd.Series([1.0, 1.0, 0.0, 1.0], index=["q1", "q2", "q3", "q4"])
    b = pd.Series([0.0, 1.0, 1.0, 0.0], index=["q4", "q3", "q2", "q1"])  # same questions, another order
    x, y = paired(a, b)
    assert list(x - y) == [1.0, 0.0, -1.0, 1.0]
    c = compare(a, b)
    assert c.n == 4 and c.diff == pytest.approx(0.25) and c.test == "McNemar (exact)" and (c.only_a, c.only_b) == (2, 1)
    with pytest.raises(ValueError, match="different questions"):
        compare(a, b.rename(index={"q1": "q9"}))


def test_paired_bootstrap_interval_covers_the_difference_and_separates_a_real_one() -> None:
    rng = np.random.default_rng(1)
    base = (rng.random(600) < 0.8).astype(float)
    worse = base.copy()
    worse[np.flatnonzero(base)[:60]] = 0.0  # 60 of the right answers lost: -10 points, all discordant one way
    c = compare(worse, base)
    assert c.diff == pytest.approx(-0.1) and c.low < -0.1 < c.high and c.high < 0 and c.direction() == -1
    # the half-width is 1.96 * sd(d) / sqrt(n) = 1.96 * 0.3 / sqrt(600) = 0.024, about half of what two
    # independent Wilson intervals (0.032 and 0.037 half-widths) would suggest by eye
    assert (c.high - c.low) / 2 == pytest.approx(0.024, rel=0.1)
    same = compare(base, base)
    assert same.diff == 0 and same.p == 1.0 and same.direction() == 0


def test_sign_flip_test_exact_and_monte_carlo() -> None:
    # four positive differences: only the all-positive and all-negative flips reach the mean: p = 2/16
    assert sign_flip_test(np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(2 / 16)
    d = np.r_[np.full(30, 0.5), np.full(30, -0.5)]
    assert sign_flip_test(d) > 0.5
    assert compare_differences(np.full(40, 0.25)).p < 1e-3


def test_soft_scores_use_the_permutation_test() -> None:
    a, b = np.linspace(0.2, 1.0, 50), np.linspace(0.1, 0.9, 50)
    c = compare(a, b)
    assert c.test == "sign-flip permutation" and c.diff == pytest.approx(0.1) and c.direction() == 1


def test_group_comparison_of_two_question_sets() -> None:
    rng = np.random.default_rng(2)
    reading, colour = rng.normal(0.2, 0.1, 80), rng.normal(0.0, 0.1, 120)
    c = compare_groups(reading, colour)
    assert c.n == 200 and c.low < c.diff < c.high and c.low > 0.1 and c.direction() == 1
    assert compare_groups(colour[:60], colour[60:]).direction() == 0


def test_holm_matches_the_step_down_rule() -> None:
    # sorted p 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04): 0.03, 0.06, 0.06
    assert holm_adjust([0.04, 0.01, 0.03]) == pytest.approx([0.06, 0.03, 0.06])
    rng = np.random.default_rng(3)
    base = (rng.random(200) < 0.7).astype(float)
    tests = holm([compare(base, base), compare(base, 1 - base)])
    assert [t.p_holm is not None for t in tests] == [True, True] and tests[0].p_holm == 1.0
    assert tests[1].p_holm == pytest.approx(min(1.0, 2 * tests[1].p))


def test_seeded_summary_mean_spread_and_per_seed_tests() -> None:
    rng = np.random.default_rng(4)
    reference = pd.Series((rng.random(300) < 0.8).astype(float), index=[f"q{i}" for i in range(300)])
    seeds = {s: pd.Series((rng.random(300) < 0.5).astype(float), index=reference.index) for s in range(5)}
    summary = seeded_summary(seeds, reference)
    means = [seeds[s].mean() for s in range(5)]
    assert summary.mean == pytest.approx(np.mean(means)) and summary.sd == pytest.approx(np.std(means, ddof=1))
    assert summary.seeds == [0, 1, 2, 3, 4] and summary.n == 300 and len(summary.per_seed) == 5
    assert all(c.p_holm is not None and c.diff > 0 for c in summary.per_seed) and summary.separated() == 5
    assert "5 seeds" in summary.text()


def test_detectable_difference_matches_the_normal_formula_and_shrinks_with_n() -> None:
    """10% discordant questions split evenly: sd of the differences sqrt(0.1); at n=600 the
    detectable difference is (z_0.975 + z_0.8) * sd / sqrt(n) = 3.6 points (t-test power, within
    1%), and 4x the questions halve it."""
    from scipy.stats import norm

    from redundancy.stats import detectable_difference

    def diffs(n: int) -> np.ndarray:
        d = np.zeros(n)
        d[: n // 20], d[n // 20 : n // 10] = 1.0, -1.0
        return d

    d600 = diffs(600)
    expected = (norm.ppf(0.975) + norm.ppf(0.8)) * d600.std(ddof=1) / np.sqrt(600)
    assert detectable_difference(d600) == pytest.approx(expected, rel=0.01)
    assert detectable_difference(diffs(2400)) == pytest.approx(detectable_difference(d600) / 2, rel=0.01)
    assert detectable_difference(np.zeros(50)) == 0.0
    assert compare(np.r_[np.ones(30), np.zeros(570)], np.zeros(600)).detectable == pytest.approx(
        detectable_difference(np.r_[np.ones(30), np.zeros(570)]))
