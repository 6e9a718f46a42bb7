"""Accuracy curves: the redundancy study (PyramidDrop Fig. 1a), vanilla- against PyramidDrop-trained
(Fig. 3) and the FLOPs-constrained trade-off (Fig. 4), each drawn from a results DataFrame.

    df, samples = load_results("results/sweep"), load_samples("results/sweep")
    layer_ratio_figure(df, samples, model="micro-llava-vanilla")
    trained_figure(df, {"vanilla-trained": "micro-llava-vanilla", "PyramidDrop-trained": "micro-llava-pdrop"})
    flops_tradeoff_figure(df, samples, model="micro-llava-vanilla", budgets=[0.3, 0.5, 0.7])

Accuracy is shown in percent with its confidence band (the rows' interval; per-family intervals
from the per-sample records ``samples`` when given). The unmodified model is the reference line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from redundancy.plots.frames import (
    OVERALL,
    NothingToDraw,
    accuracy_long,
    average_seeds,
    column,
    note_missing,
    official_options,
    panel_families,
    rows_of_model,
)
from redundancy.plots.style import (
    BAND_ALPHA,
    REFERENCE,
    add_legend,
    flops_scale,
    new_figure,
    pair_palette,
    palette,
    panel_grid,
    percent,
    styled,
)

STUDY_LAYERS = (2, 8, 16, 24)


# ------------------------------------------------------------------ helpers

def checkpoints(rows: pd.DataFrame) -> str:
    """The checkpoints a figure describes, each with its content fingerprint: ``name (1a2b3c4d5e6f7a8b)``."""
    pairs = (
        rows[["model", "checkpoint_id"]].drop_duplicates()
        if "checkpoint_id" in rows
        else rows[["model"]].drop_duplicates()
    )
    return ", ".join(f"{r.model} ({r.checkpoint_id})" if "checkpoint_id" in rows else str(r.model)
                     for r in pairs.itertuples())


def curve(ax: Axes, data: pd.DataFrame, x: str, color: object, *, style: str = "-", label: str | None = None,
          band: bool = True, marker: str = "o") -> None:
    """Accuracy (%) against column ``x``, sorted by ``x``, with the confidence band where known."""
    data = data.sort_values(x)
    xs = data[x].to_numpy(float)
    ax.plot(xs, percent(data["accuracy"]), style, color=color, marker=marker, markersize=3, lw=1.4, label=label)
    if band and data["ci_low"].notna().all():
        ax.fill_between(xs, percent(data["ci_low"]), percent(data["ci_high"]), color=color, alpha=BAND_ALPHA, lw=0)


def reference(ax: Axes, ref: pd.DataFrame, color: object = REFERENCE, style: str = ":") -> None:
    """The unmodified model's accuracy as a horizontal line, its interval as a band."""
    if ref.empty:
        return
    row = ref.iloc[0]
    ax.axhline(100 * row["accuracy"], color=color, ls=style, lw=1.2)
    if pd.notna(row["ci_low"]):
        ax.axhspan(100 * row["ci_low"], 100 * row["ci_high"], color=color, alpha=0.08, lw=0)


def panel_title(family: str, data: pd.DataFrame) -> str:
    n = data["n"].dropna()
    return f"{family} (n={int(n.max())})" if len(n) else family


def explain_empty(ax: Axes, text: str) -> None:
    """Say in an empty panel why it is empty (never a blank panel)."""
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="0.35")


def control_label(control: str, long: pd.DataFrame) -> str:
    """``random control (mean of 5 seeds)``: the control's legend entry."""
    seeds = column(long[long["ranker"] == control], "seeds").dropna()
    k = int(seeds.max()) if len(seeds) else 1
    return f"{control} control" + (f" (mean of {k} seeds)" if k > 1 else " (1 seed)")


def note_family_bands(long: pd.DataFrame) -> None:
    fam = long[long["family"] != OVERALL]
    if len(fam) and fam["ci_low"].isna().all():
        note_missing("no per-sample records: per-family panels are drawn without confidence bands")


# ------------------------------------------------------------------ Fig. 1a
@styled
def layer_ratio_figure(
    results: pd.DataFrame, samples: pd.DataFrame | None = None, *, model: str | None = None, data: str | None = None,
    layers: Sequence[int] = STUDY_LAYERS, ranker: str = "last", control: str | None = "random",
    families: Sequence[str] | None = None,
) -> Figure:
    """PyramidDrop Fig. 1a: accuracy against keep ratio, one line per drop layer (``method=drop``,
    ranked by ``ranker``), the ``control`` ranker dashed, the unmodified model dotted; one panel
    overall and one per question family (``families``: which, in order; default all)."""
    rankers = [ranker] + ([control] if control else [])
    rows = rows_of_model(results, model, data, rankers)
    drop = rows[rows["method"] == "drop"]
    if drop.empty:
        raise NothingToDraw("fig1: no single-layer drop rows (method=drop); "
                            "run: python -m redundancy.sweep experiment=fig1_redundancy")
    long = average_seeds(accuracy_long(rows, samples))
    note_family_bands(long)
    panels = panel_families(long, None if families is None else [OVERALL, *families])
    colors = palette(len(layers))
    for name, which in ((ranker, "attention-ranked"), (control, "control")):
        for layer in layers if name else ():
            if drop[(drop["layer"] == layer) & (drop["ranker"] == name)].empty:
                note_missing(f"fig1: no {which} rows (ranker={name}) at layer {layer}")
    if rows[rows["method"] == "vanilla"].empty:
        note_missing("fig1: no vanilla reference row")
    fig, axes, spare = panel_grid(len(panels), sharey=True)
    for ax, family in zip(axes, panels):
        here = long[long["family"] == family]
        for layer, color in zip(layers, colors):
            at = here[(here["method"] == "drop") & (here["layer"] == layer)]
            curve(ax, at[at["ranker"] == ranker], "ratio", color, label=f"layer {layer}")
            if control:
                curve(ax, at[at["ranker"] == control], "ratio", color, style="--", band=False, marker="x")
        reference(ax, here[here["method"] == "vanilla"])
        ax.set_title(panel_title(family, here))
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("keep ratio r")
        ax.yaxis.set_tick_params(labelleft=True)
    axes[0].set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=c, marker="o", markersize=3, label=f"drop at layer {k}")
               for k, c in zip(layers, colors)]
    handles.append(Line2D([], [], color="k", ls="-", label=f"ranked by attention ({ranker})"))
    if control and (drop["ranker"] == control).any():
        handles.append(Line2D([], [], color="k", ls="--", marker="x", markersize=3, label=control_label(control, long)))
    handles.append(Line2D([], [], color=REFERENCE, ls=":", label="no drop (vanilla)"))
    add_legend(fig, handles, spare)
    fig.suptitle(f"Image tokens dropped at one layer: {checkpoints(rows)}\n"
                 "(r: fraction of the image tokens kept from the drop layer on; bands: 95% intervals)")
    return fig


# ------------------------------------------------------------------ Fig. 3
@styled
def trained_figure(
    results: pd.DataFrame, models: Mapping[str, str], *, data: str | None = None,
    layers: Sequence[int] = STUDY_LAYERS, ranker: str = "last", control: str | None = "random",
) -> Figure:
    """PyramidDrop Fig. 3: the Fig. 1a curves (overall) of each checkpoint in ``models``
    (legend label -> model name), one column per drop layer, the ``control`` ranker dashed (mean over
    its seeds). Top row: accuracy; bottom row: the change from the same checkpoint's no-drop accuracy
    (percentage points)."""
    per_model: dict[str, pd.DataFrame] = {}
    rankers = [ranker] + ([control] if control else [])
    for label, name in models.items():
        try:
            per_model[label] = average_seeds(accuracy_long(rows_of_model(results, name, data, rankers)))
        except NothingToDraw:
            note_missing(f"fig3: no rows for {label} ({name})")
    if not per_model:
        raise NothingToDraw(f"fig3: no rows for any of {list(models.values())}")
    fig, axes = new_figure(2, len(layers), aspect=1.0, extra=1.0, sharex=True, sharey="row")
    colors = dict(zip(models, palette(len(models))))
    for label, long in per_model.items():
        overall = long[long["family"] == OVERALL]
        ref = overall[overall["method"] == "vanilla"]
        if ref.empty:
            note_missing(f"fig3: no vanilla reference row for {label}")
        for col, layer in enumerate(layers):
            here = overall[(overall["method"] == "drop") & (overall["layer"] == layer)]
            at = here[here["ranker"] == ranker]
            if at.empty:
                note_missing(f"fig3: no rows for {label} at layer {layer}")
                continue
            curve(axes[0, col], at, "ratio", colors[label], label=label)
            reference(axes[0, col], ref, color=colors[label])
            for part, style, marker in ((at, "-", "o"), (here[here["ranker"] == control], "--", "x")):
                if len(part) and not ref.empty:
                    delta = part.assign(accuracy=part["accuracy"] - ref["accuracy"].iloc[0])
                    curve(axes[1, col], delta, "ratio", colors[label], style=style, marker=marker, band=False)
    for col, layer in enumerate(layers):
        axes[0, col].set_title(f"drop at layer {layer}")
        axes[1, col].axhline(0, color=REFERENCE, lw=0.8)
        if not any(len(line.get_xdata()) > 1 for line in axes[0, col].get_lines()):
            explain_empty(axes[0, col], f"no drop rows\nat layer {layer}")
    for ax in axes[1]:
        ax.set_xlabel("keep ratio r")
    axes[0, 0].set_ylabel("accuracy (%)")
    axes[1, 0].set_ylabel("change from no drop (points)")
    handles = [Line2D([], [], color=colors[k], marker="o", markersize=3, label=k) for k in per_model]
    controls = pd.concat(list(per_model.values()))
    if control and (controls["ranker"] == control).any():
        handles.append(Line2D([], [], color="k", ls="--", marker="x", markersize=3,
                              label=control_label(control, controls) + ", bottom row"))
    handles.append(Line2D([], [], color=REFERENCE, ls=":", label="no drop (same checkpoint)"))
    add_legend(fig, handles, None)
    fig.suptitle("Vanilla- against PyramidDrop-trained checkpoint, image tokens dropped at one layer\n"
                 f"{checkpoints(pd.concat(per_model.values()))}\n"
                 "(r: fraction of the image tokens kept from the drop layer on; bands: 95% intervals)")
    return fig


# ------------------------------------------------------------------ Fig. 4
@styled
def flops_tradeoff_figure(
    results: pd.DataFrame, samples: pd.DataFrame | None = None, *, model: str | None = None, data: str | None = None,
    K: int = 2, layers: Sequence[int] = (8, 16, 24), budgets: Sequence[float] = (),
    families: Sequence[str] | None = None, ranker: str = "last", control: str | None = "random",
) -> Figure:
    """PyramidDrop Fig. 4: accuracy against image-part TFLOPs for FastV (layer ``K``) and
    PyramidDrop (boundaries ``layers``) at every R / lam in the results, the unmodified model as a
    reference; ``budgets`` (fractions of the unmodified model's image-part TFLOPs) as vertical lines.
    Solid: ranked by ``ranker`` with the method's own position policy; dashed: the ``control`` ranker
    (mean over its seeds); dash-dotted: ``ranker`` with the other position policy (where recorded)."""
    rows = rows_of_model(results, model, data, [ranker] + ([control] if control else []), official=False)
    fastv = rows[(rows["method"] == "fastv") & (column(rows, "params.K") == K)]
    pdrop = rows[(rows["method"] == "pdrop") & rows["boundaries"].map(lambda b: list(b) == list(layers))]
    if fastv.empty and pdrop.empty:
        raise NothingToDraw("fig4: no FastV or PyramidDrop rows; "
                            "run: python -m redundancy.sweep -m experiment=fig4_fastv,fig4_pdrop")
    for name, part in (("FastV", fastv), ("PyramidDrop", pdrop)):
        if part.empty:
            note_missing(f"fig4: no {name} rows")
    van = rows[rows["method"] == "vanilla"]
    if van.empty:
        note_missing("fig4: no vanilla reference row (budgets are not drawn)")
    long = average_seeds(accuracy_long(pd.concat([fastv, pdrop, van]), samples))
    note_family_bands(long[long["ranker"] == ranker])
    factor, unit = flops_scale(long["image_tflops"])
    long["image_flops"] = long["image_tflops"] * factor
    panels = panel_families(long, None if families is None else [OVERALL, *families])
    colors = pair_palette()
    labels = (f"FastV (K={K})", f"PyramidDrop (layers {', '.join(map(str, layers))})")
    variants = {"own": False, "control": False, "other": False}  # which line styles were drawn
    fig, axes, spare = panel_grid(len(panels), sharey=True)
    for ax, family in zip(axes, panels):
        here = long[long["family"] == family]
        ax.yaxis.set_tick_params(labelleft=True)
        for method, color, label in zip(("fastv", "pdrop"), colors, labels):
            options = official_options(method)
            mine = here[(here["method"] == method) & (here["rank_layer"] == options["rank_layer"])]
            own = options["positions"]
            ranked, other = mine[mine["ranker"] == ranker], mine[mine["ranker"] == control]
            series = {"own": (ranked[ranked["positions"] == own], "-", "o", True),
                      "control": (other[other["positions"] == own], "--", "x", False),
                      "other": (ranked[ranked["positions"] != own], "-.", "s", False)}
            for kind, (part, style, marker, band) in series.items():
                if len(part):
                    curve(ax, part, "image_flops", color, style=style, marker=marker, band=band,
                          label=label if kind == "own" else None)
                    variants[kind] = True
        ref = here[here["method"] == "vanilla"]
        reference(ax, ref)
        if not ref.empty:
            full = float(ref["image_flops"].iloc[0])
            ax.plot([full], [100 * ref["accuracy"].iloc[0]], "*", color=REFERENCE, markersize=7)
            for b in budgets:
                ax.axvline(b * full, color="0.75", lw=0.6, zorder=0)
        ax.set_title(panel_title(family, here))
    fig.supxlabel(f"image-part {unit} per sample (LM prefill, image tokens only)")
    axes[0].set_ylabel("accuracy (%)")
    handles = [Line2D([], [], color=c, marker="o", markersize=3, label=label) for c, label in zip(colors, labels)]
    if variants["control"] and control:
        handles.append(Line2D([], [], color="k", ls="--", marker="x", markersize=3, label=control_label(control, long)))
    if variants["other"]:
        handles.append(Line2D([], [], color="k", ls="-.", marker="s", markersize=3,
                              label="other position policy (keep / compact)"))
    handles.append(Line2D([], [], color=REFERENCE, ls=":", marker="*", label="no drop (vanilla)"))
    if budgets and not van.empty:
        handles.append(Line2D([], [], color="0.75", label="FLOPs budgets"))
    add_legend(fig, handles, spare)
    convention = column(rows, "flops_convention").dropna()
    name = f"FLOPs: {convention.iloc[0].split(':')[0]} convention (docs/method.md section 7)" if len(convention) else ""
    fig.suptitle(f"Accuracy under a FLOPs budget: {checkpoints(rows)}\n{name}".strip())
    return fig
