"""One figure per claim: the forest plot draws each comparison where its numbers say, coloured by
its test."""

from __future__ import annotations

import numpy as np
import pytest

from redundancy.plots.forest import AGAINST, AS_CLAIMED, NOT_SEPARATED, claim_figure, direction_colour
from redundancy.stats import compare


def _comparisons() -> list:
    right, wrong = np.r_[np.ones(60), np.zeros(540)], np.zeros(600)
    return [("a wins", compare(right, wrong)), ("a loses", compare(wrong, right)),
            ("tie", compare(np.r_[np.ones(3), np.zeros(597)], np.r_[np.zeros(3), np.ones(1), np.zeros(596)]))]


def test_colours_follow_the_test() -> None:
    colours = [direction_colour(c) for _, c in _comparisons()]
    assert colours == [AS_CLAIMED, AGAINST, NOT_SEPARATED]


def test_forest_plot_draws_each_difference_with_its_interval() -> None:
    comps = _comparisons()
    fig = claim_figure(2, "Redundancy grows with depth.", "inconclusive at this n", "600", comps, margin=None)
    ax = fig.axes[0]
    centres = sorted(float(line.get_xdata()[0]) for line in ax.lines if len(line.get_xdata()) == 1
                     and line.get_marker() == "o")
    assert centres == pytest.approx(sorted(100 * c.diff for _, c in comps))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["tie", "a loses", "a wins"]
    title = fig.get_suptitle()
    assert "Claim 2" in title and "n = 600" in title
    assert fig.get_size_inches()[0] <= 7.0


def test_equivalence_claims_are_coloured_against_the_margin() -> None:
    _, small_loss = ("x", compare(np.r_[np.zeros(3), np.ones(597)], np.ones(600)))
    fig = claim_figure(3, "No obvious decline.", "reproduced", "600", [("layer 16", small_loss)], margin=0.02)
    marker = next(line for line in fig.axes[0].lines if line.get_marker() == "o")
    assert marker.get_color() == AS_CLAIMED  # -0.5 points, interval above -2: equivalent
    with pytest.raises(ValueError, match="no comparison"):
        claim_figure(4, "x", "y", "0", [])
