"""Shared look of the figures and the one way they are written (vector PDF + PNG preview)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.typing import RcKeyType

FORMATS = ("pdf", "png")
PAGE_WIDTH = 7.0  # inches: a two-column paper's text width; every figure is drawn at most this wide
COLUMN_WIDTH = 3.4  # inches: one column
MIN_FONT = 7  # points at the figure's printed size (figures are drawn at the size they print)
REFERENCE = "0.25"  # the vanilla reference line and band
BAND_ALPHA = 0.15
RC: dict[RcKeyType, Any] = {
    "pdf.fonttype": 42,  # TrueType text in the PDF (editable, searchable)
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": MIN_FONT,
    "ytick.labelsize": MIN_FONT,
    "legend.fontsize": MIN_FONT,
    "figure.titlesize": 9,
    "figure.labelsize": 8,
}
# Okabe & Ito's colour-blind-safe qualitative palette (blue, orange, bluish green, reddish purple,
# vermillion, sky blue, yellow): neighbours differ in hue and lightness for every colour-vision type.
OKABE_ITO = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9", "#F0E442")


P = ParamSpec("P")


def styled(draw: Callable[P, Figure]) -> Callable[P, Figure]:
    """Draw a figure under :data:`RC`, so that every title, label and legend made while drawing takes
    its sizes (matplotlib reads them when a text is made, not when it is saved)."""

    @functools.wraps(draw)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Figure:
        with mpl.rc_context(RC):
            return draw(*args, **kwargs)

    return wrapper


def palette(n: int) -> list[str]:
    """``n`` distinct colour-blind-safe qualitative colours (:data:`OKABE_ITO`, in order): one per
    drop layer, model or method."""
    if n > len(OKABE_ITO):
        raise ValueError(f"{n} colours asked; the qualitative palette has {len(OKABE_ITO)}")
    return list(OKABE_ITO[:n])


def pair_palette() -> list[str]:
    """Two distinct colours for method-against-method figures (blue, vermillion)."""
    return [OKABE_ITO[0], OKABE_ITO[4]]


def new_figure(
    rows: int, cols: int, panel: tuple[float, float] | None = None, width: float = PAGE_WIDTH,
    aspect: float = 0.8, extra: float = 0.6, **kw: Any,
) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows x cols`` panels (a 2-D array of axes), constrained layout, no pyplot state;
    ``width`` inches wide (the page by default), panels ``aspect`` as high as wide, or ``panel``
    ``(w, h)`` inches each, scaled down to fit the page; ``extra`` inches of height for the titles
    and a legend below the panels."""
    if panel is None:
        panel = (width / cols, aspect * width / cols)
    scale = min(1.0, PAGE_WIDTH / (panel[0] * cols))
    with mpl.rc_context(RC):
        fig = Figure(figsize=(panel[0] * cols * scale, panel[1] * rows * scale + extra), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, **kw)
    for ax in axes.flat:
        _apply_rc(ax)
    return fig, axes


def panel_grid(panels: int, cols: int = 3, aspect: float = 0.8, **kw: Any) -> tuple[Figure, list[Axes], Axes | None]:
    """``panels`` panels on a page-wide grid of ``cols`` columns (never a one-row strip); returns the
    figure, the panels' axes and the first unused slot (for the legend; further ones stay blank) or
    ``None`` when the panels fill the grid."""
    cols = max(1, min(cols, panels))
    rows = -(-panels // cols)
    below = panels % cols == 0  # no unused slot: the legend goes below the panels
    fig, axes = new_figure(rows, cols, aspect=aspect, extra=1.3 if below else 0.6, **kw)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_axis_off()
    return fig, flat[:panels], flat[panels] if panels < len(flat) else None


def add_legend(fig: Figure, handles: list, spare: Axes | None) -> None:
    """The figure's one legend: in the grid's unused slot when there is one, else below the panels."""
    if spare is not None:
        spare.legend(handles=handles, loc="center", frameon=False)
    else:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), frameon=False)


def _apply_rc(ax: Axes) -> None:
    # rc_context only covers creation; set what later drawing reads on the axes themselves.
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, alpha=RC["grid.alpha"])
    ax.tick_params(labelsize=MIN_FONT)


def percent(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Accuracy fractions as percentages (the unit every axis and table shows)."""
    return 100.0 * np.asarray(values, dtype=float)


def flops_scale(tflops: Sequence[float] | np.ndarray) -> tuple[float, str]:
    """``(factor, unit)`` that shows ``tflops`` as readable numbers: TFLOPs, or GFLOPs / MFLOPs for
    small models (the micro-LLaVA's image part is well under a TFLOP)."""
    top = float(np.nanmax(np.asarray(tflops, float))) if len(tflops) else 1.0
    for factor, unit in ((1.0, "TFLOPs"), (1e3, "GFLOPs"), (1e6, "MFLOPs")):
        if top * factor >= 0.1:
            return factor, unit
    return 1e6, "MFLOPs"


def save_figure(
    fig: Figure, name: str, folder: str | Path, formats: Sequence[str] = FORMATS, dpi: int = 150
) -> list[Path]:
    """Write ``fig`` as ``<folder>/<name>.<fmt>`` for each format; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    with mpl.rc_context(RC):
        for fmt in formats:
            path = folder / f"{name}.{fmt}"
            # A fixed date keeps the PDF bytes the same when nothing changed.
            metadata = {"CreationDate": None} if fmt == "pdf" else {"Software": None} if fmt == "png" else None
            fig.savefig(path, dpi=dpi, metadata=metadata)
            out.append(path)
    return out
