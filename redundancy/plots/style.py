"""Shared look of the figures and the one way they are written (vector PDF + PNG preview)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib as mpl
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

FORMATS = ("pdf", "png")
REFERENCE = "0.25"  # the vanilla reference line and band
BAND_ALPHA = 0.12
RC = {
    "pdf.fonttype": 42,  # TrueType text in the PDF (editable, searchable)
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "font.size": 9,
    "axes.titlesize": 9,
    "legend.fontsize": 8,
}


def palette(n: int, name: str = "viridis") -> list[tuple[float, float, float]]:
    """``n`` ordered, distinct colours (shallow -> deep layers); the pale end of the map is left out."""
    return list(sns.color_palette(name, n + 1))[:n]


def pair_palette() -> list[tuple[float, float, float]]:
    """Two distinct colours for method-against-method figures."""
    return list(sns.color_palette("colorblind", 2))


def new_figure(
    rows: int, cols: int, panel: tuple[float, float] = (2.6, 2.3), **kw: object
) -> tuple[Figure, np.ndarray]:
    """A figure of ``rows x cols`` panels (a 2-D array of axes), constrained layout, no pyplot state."""
    with mpl.rc_context(RC):
        fig = Figure(figsize=(panel[0] * cols, panel[1] * rows), layout="constrained")
        axes = fig.subplots(rows, cols, squeeze=False, **kw)
    for ax in axes.flat:
        _apply_rc(ax)
    return fig, axes


def _apply_rc(ax: Axes) -> None:
    # rc_context only covers creation; set what later drawing reads on the axes themselves.
    ax.spines[["top", "right"]].set_visible(False)
    ax.grid(True, alpha=RC["grid.alpha"])
    ax.tick_params(labelsize=RC["font.size"] - 1)


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
