"""One figure per claim: each paired comparison the claim's verdict rests on, as a difference in
points with its 95% interval (a forest plot), coloured by what its test found.

    fig = claim_figure(number, statement, verdict, n, comparisons, margin=None)

``comparisons`` are ``(label, Comparison)`` pairs (:mod:`redundancy.stats`), ``a - b`` with ``a``
the side the paper expects to be higher (or, for an equivalence claim, the change from no drop,
whose interval is drawn against ``-margin``). A claim with no comparison (its rows are missing, or
its test is not a paired difference) gets no figure.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from redundancy.plots.style import COLUMN_WIDTH, MIN_FONT, OKABE_ITO, REFERENCE, new_figure, styled
from redundancy.stats import ALPHA, Comparison

AS_CLAIMED, AGAINST, NOT_SEPARATED = OKABE_ITO[0], OKABE_ITO[4], "0.45"
ROW_HEIGHT = 0.22  # inches per comparison


def direction_colour(c: Comparison, alpha: float = ALPHA) -> str:
    """Blue when the comparison separates as claimed (``a > b``, Holm-adjusted), vermillion when
    against, grey when not separated at this n."""
    return {1: AS_CLAIMED, -1: AGAINST, 0: NOT_SEPARATED}[c.direction(alpha)]


@styled
def claim_figure(
    number: int, statement: str, verdict: str, n: str, comparisons: Sequence[tuple[str, Comparison]],
    margin: float | None = None, width: float = 2 * COLUMN_WIDTH,
) -> Figure:
    """The forest plot of one claim: one row per comparison (difference in points and its interval),
    the zero line, ``-margin`` for an equivalence claim; the title wraps the paper's statement and
    gives the verdict and n."""
    if not comparisons:
        raise ValueError(f"claim {number}: no comparison to draw")
    rows = len(comparisons)
    fig, axes = new_figure(1, 1, panel=(width, max(1.0, ROW_HEIGHT * rows + 0.4)), extra=0.9)
    ax = axes[0, 0]
    for i, (_, c) in enumerate(comparisons):
        y = rows - 1 - i
        colour = direction_colour(c) if margin is None else (
            AS_CLAIMED if c.low >= -margin else AGAINST if c.high < -margin else NOT_SEPARATED)
        ax.errorbar(100 * c.diff, y, xerr=[[100 * (c.diff - c.low)], [100 * (c.high - c.diff)]], fmt="o",
                    color=colour, markersize=3.5, capsize=2, linewidth=1)
    ax.axvline(0, color=REFERENCE, linewidth=0.8)
    if margin is not None:
        ax.axvline(-100 * margin, color=REFERENCE, linewidth=0.8, linestyle="--")
    ax.set_yticks(range(rows), [label for label, _ in reversed(comparisons)], fontsize=MIN_FONT)
    ax.set_ylim(-0.7, rows - 0.3)
    ax.set_xlabel("difference, points (95% paired-bootstrap interval)")
    title = textwrap.fill(f"Claim {number}: {statement}", 95)
    # a figure title from the left edge: long comparison labels push the axes right, not the title
    fig.suptitle(f"{title}\nverdict: {verdict}; n = {n}", x=0.01, ha="left", fontsize=MIN_FONT + 1)
    handles = [Line2D([], [], color=AS_CLAIMED, marker="o", linestyle="", label="as claimed"),
               Line2D([], [], color=AGAINST, marker="o", linestyle="", label="against the claim"),
               Line2D([], [], color=NOT_SEPARATED, marker="o", linestyle="", label="not separated at this n")]
    if margin is not None:
        handles.append(Line2D([], [], color=REFERENCE, linestyle="--", label=f"equivalence margin -{100 * margin:.0f}"))
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    return fig
