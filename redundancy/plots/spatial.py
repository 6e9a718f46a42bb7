"""The rankers study's figures: where each ranker's kept image tokens lie (heatmaps over the image grid,
from the rows' ``spatial`` counts, :mod:`redundancy.spatial`) and its accuracy at equal FLOPs; and the
accuracy of a point split by where its questions' evidence lies (:func:`redundancy.data.evidence_position`).

    rows, samples = load_results("results/sweep"), load_samples("results/sweep")
    kept_heatmap_figure(rows, model="micro-llava-vanilla", layer=2, ratio=0.1)
    ranker_accuracy_figure(rows, samples, models=["micro-llava-vanilla", "micro-llava-pdrop"], layers=[2, 16])
    evidence_accuracy(scores, test_set_positions(rows))   # {"top": Estimate, "bottom": ..., "both": ...}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from redundancy.plots.frames import NothingToDraw, latest, note_missing, select
from redundancy.plots.style import REFERENCE, new_figure, palette, panel_grid, percent, styled
from redundancy.spatial import bottom_share, main_grid
from redundancy.stats import Estimate, accuracy

RANKERS = ("last", "instruction", "mean", "norope", "debias", "nosink", "nosink_keep", "vision_cls", "random",
           "uniform", "pool", "inverse")
"""The rankers study's rankers, in the order the figures draw them (conf/sweep/experiment/rankers.yaml)."""


# ------------------------------------------------------------------ evidence position
def test_set_positions(rows: pd.DataFrame) -> dict[str, str] | None:
    """Question id -> evidence position of the shipped microvqa test set, when ``rows`` were evaluated on
    it (their ``data_id`` is its fingerprint); None otherwise (another benchmark has no boxes)."""
    from redundancy.data import QUESTIONS_FILE, evidence_positions
    from redundancy.loading import TEST_SET
    from redundancy.results import fingerprint

    if rows.empty or "data_id" not in rows or fingerprint([TEST_SET / QUESTIONS_FILE]) not in set(rows["data_id"]):
        return None
    return evidence_positions(TEST_SET)


def evidence_accuracy(scores: pd.Series, positions: Mapping[str, str]) -> dict[str, Estimate]:
    """Accuracy (:func:`redundancy.stats.accuracy`, with its interval) of per-question ``scores`` (indexed
    by question id) on the questions of each evidence position; questions without a position are left out."""
    where = scores.index.map(lambda q: positions.get(str(q)))
    return {p: accuracy(scores[np.asarray(where == p)]) for p in dict.fromkeys(positions.values())
            if (where == p).any()}


# ------------------------------------------------------------------ rows of the study
def study_rows(rows: pd.DataFrame, model: str, data: str, layer: int, ratio: float) -> pd.DataFrame:
    """The ``method=drop`` rows of ``model`` at ``layer`` and ``ratio`` (one per ranker and seed)."""
    mine = latest(select(rows, model=model, data=data, method="drop"))
    if mine.empty:
        return mine
    return mine[(mine["layer"] == layer) & ((mine["ratio"].astype(float) - ratio).abs() < 1e-9)]


def kept_grid(rows: pd.DataFrame) -> tuple[np.ndarray, float] | None:
    """The share of questions that kept each cell of the image grid at the first boundary, averaged over
    ``rows`` (a ranker's seeds), and the bottom-half share of the kept tokens; None without counts."""
    parts = [r["boundaries"][0] for r in rows.get("spatial", pd.Series(dtype=object)) if r and r["boundaries"]]
    if not parts:
        return None
    grid = main_grid(parts[0])
    shares = [np.asarray(p["grids"][grid], float) / q for p, q in
              zip(parts, [r["questions"] for r in rows["spatial"] if r and r["boundaries"]])]
    return np.mean(shares, axis=0), float(np.mean([bottom_share(p, grid) for p in parts]))


@styled
def kept_heatmap_figure(rows: pd.DataFrame, model: str, layer: int, ratio: float, data: str = "microvqa",
                        rankers: Sequence[str] = RANKERS, cols: int = 4) -> Figure:
    """One panel per ranker: the share of questions that kept each image-grid cell when dropping at
    ``layer`` to ``ratio`` (row x column, top of the image at the top), and the bottom-half share of the
    kept tokens in the title. Rankers without rows or without counts (rows written before the spatial
    diagnostics) are reported missing."""
    here = study_rows(rows, model, data, layer, ratio)
    grids = {}
    for ranker in rankers:
        mine = here[here["ranker"] == ranker] if not here.empty else here
        found = kept_grid(mine) if not mine.empty else None
        if found is None:
            note_missing(f"{model} layer {layer} r={ratio:g} {ranker}: "
                         + ("no row" if mine.empty else "rows without spatial counts (written before them)"))
            continue
        grids[ranker] = found
    if not grids:
        raise NothingToDraw(f"no spatial counts for {model} at layer {layer}, r={ratio:g}")
    fig, axes, spare = panel_grid(len(grids), cols=cols, aspect=1.0)
    image = None
    for ax, (ranker, (share, bottom)) in zip(axes, grids.items()):
        image = ax.imshow(share, vmin=0.0, vmax=1.0, cmap="viridis", interpolation="nearest")
        ax.set_title(f"{ranker}: bottom {100 * bottom:.0f}%")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.grid(False)
    if image is not None:
        bar = fig.colorbar(image, ax=axes, shrink=0.6, location="right")
        bar.set_label("share of questions keeping the cell")
    if spare is not None:
        spare.set_axis_off()
    fig.suptitle(f"{model}: kept image tokens at layer {layer}, {100 * ratio:g}% kept (the image's top at the top)")
    return fig


@styled
def ranker_accuracy_figure(rows: pd.DataFrame, models: Sequence[str], layers: Sequence[int], ratio: float,
                           data: str = "microvqa", rankers: Sequence[str] = RANKERS) -> Figure:
    """Accuracy (%) of each ranker at ``ratio`` with its 95% interval, one panel per drop layer, one
    colour per model (a seeded ranker: the mean over its seeds, the bar its min..max), the unmodified
    model dotted. Equal layer and ratio mean equal image-part FLOPs for every ranker."""
    colours = palette(len(models))
    fig, axes = new_figure(len(layers), 1, panel=(7.0, 2.0), extra=0.8)
    drawn: set[str] = set()
    for ax, layer in zip(axes[:, 0], layers):
        for m, (model, colour) in enumerate(zip(models, colours)):
            here = study_rows(rows, model, data, layer, ratio)
            vanilla = latest(select(rows, model=model, data=data, method="vanilla"))
            if not vanilla.empty:
                ax.axhline(100 * vanilla.iloc[0]["accuracy"], color=colour, ls=":", lw=1.0)
            if here.empty:
                note_missing(f"{model} layer {layer} r={ratio:g}: no rankers-study rows")
                continue
            for x, ranker in enumerate(rankers):
                mine = here[here["ranker"] == ranker]
                if mine.empty:
                    note_missing(f"{model} layer {layer} r={ratio:g} {ranker}: no row")
                    continue
                acc = percent(mine["accuracy"])
                if len(mine) > 1:  # seeds
                    centre, low, high = acc.mean(), acc.min(), acc.max()
                else:
                    centre, low, high = acc[0], 100 * mine.iloc[0]["ci_low"], 100 * mine.iloc[0]["ci_high"]
                xs = x + (m - (len(models) - 1) / 2) * 0.25
                ax.errorbar([xs], [centre], yerr=[[centre - low], [high - centre]], fmt="o", ms=3, color=colour,
                            capsize=2, lw=1.0)
                drawn.add(ranker)
        ax.set_xticks(range(len(rankers)), rankers, rotation=30, ha="right")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"drop at layer {layer}, {100 * ratio:g}% of the image tokens kept")
    if len(drawn) < 2:
        raise NothingToDraw(f"rows of fewer than two rankers at layers {list(layers)}, r={ratio:g} "
                            "(python -m redundancy.sweep -m experiment=rankers model=...)")
    handles = [Line2D([], [], color=c, marker="o", ls="", label=m) for m, c in zip(models, colours)]
    handles.append(Line2D([], [], color=REFERENCE, ls=":", label="no drop (each model's colour)"))
    fig.legend(handles=handles, loc="outside lower center", ncols=3, frameon=False)
    return fig
