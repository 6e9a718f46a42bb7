"""Figures drawn over the images, from a recorded :class:`~redundancy.plots.records.MapRecord`:
the query's attention over the image grid (PyramidDrop Fig. 1b) and the image tokens kept at each
PyramidDrop stage (Fig. 5). The patches of the objects a question names are outlined in white.

    record = load_maps("results/maps/micro-llava-vanilla.npz")
    attention_figure(record, layers=(2, 16))
    attention_layers_figure(record, question=0)
    retained_figure(record)
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine

from redundancy.plots.frames import NothingToDraw, note_missing
from redundancy.plots.records import MapRecord, evidence_share
from redundancy.plots.style import MIN_FONT, new_figure, styled

CMAP = "inferno"
DROPPED = (0.1, 0.1, 0.1, 0.8)  # RGBA over dropped patches
OUTLINE = "white"
# The caption of a map whose recorded attention on the image sums to 0 (the query attends only to
# text tokens at that layer, or the recorded values underflowed float16): the panel shows no overlay.
EMPTY_MAP = "no attention on\nthe image (sum 0)"


# ------------------------------------------------------------------ drawing pieces
def spaced(fig: Figure) -> Figure:
    """Room between rows of image panels, so that a caption never touches the next row's title."""
    engine = fig.get_layout_engine()
    assert isinstance(engine, ConstrainedLayoutEngine)  # every figure here is made constrained (style.new_figure)
    engine.set(h_pad=6 / 72, hspace=0.04)
    return fig


def show_image(ax: Axes, image: np.ndarray) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def extent(image: np.ndarray) -> tuple[float, float, float, float]:
    """Grid cells stretched over the whole image (left, right, bottom, top in pixels)."""
    h, w = image.shape[:2]
    return (-0.5, w - 0.5, h - 0.5, -0.5)


def distribution(grid_values: np.ndarray) -> np.ndarray:
    """Attention over the image tokens as shares of the image's attention (sums to 1; NaN -> 0)."""
    values = np.nan_to_num(np.asarray(grid_values, np.float64))
    total = values.sum()
    return values / total if total > 0 else values


def overlay_attention(ax: Axes, image: np.ndarray, shares: np.ndarray, top: float, alpha: float = 0.65) -> None:
    """``[grid, grid]`` attention shares over the image, colour from 0 to ``top`` (shared by the maps
    of one question, so a near-uniform map stays dark and a concentrated one lights up)."""
    ax.imshow(shares, cmap=CMAP, vmin=0.0, vmax=top or 1.0, alpha=alpha, extent=extent(image), interpolation="nearest")


def question_maps(record: MapRecord, q: int, layers: Sequence[int]) -> tuple[list[np.ndarray], float]:
    """The question's attention shares at ``layers`` and their common colour maximum."""
    maps = [distribution(record.attention_at(q, layer)) for layer in layers]
    return maps, max((float(m.max()) for m in maps), default=1.0)


def dim_dropped(ax: Axes, image: np.ndarray, present: np.ndarray) -> None:
    """Darken the patches not in ``present`` (``[grid, grid]`` bool)."""
    rgba = np.zeros((*present.shape, 4))
    rgba[~present] = DROPPED
    ax.imshow(rgba, extent=extent(image), interpolation="nearest")


def outline(ax: Axes, image: np.ndarray, indices: Sequence[int], grid: int) -> None:
    """The border of the union of the patches ``indices`` (raster order on a ``grid x grid`` grid)."""
    if not indices:
        return
    cell = np.array(image.shape[1::-1], float) / grid  # (width, height) of a patch in pixels
    inside = {int(i) for i in indices}
    segments = []
    for i in inside:
        r, c = divmod(i, grid)
        x0, y0 = c * cell[0] - 0.5, r * cell[1] - 0.5
        x1, y1 = x0 + cell[0], y0 + cell[1]
        sides = {(r - 1, c): [(x0, y0), (x1, y0)], (r + 1, c): [(x0, y1), (x1, y1)],
                 (r, c - 1): [(x0, y0), (x0, y1)], (r, c + 1): [(x1, y0), (x1, y1)]}
        for (rr, cc), seg in sides.items():
            if not (0 <= rr < grid and 0 <= cc < grid) or rr * grid + cc not in inside:
                segments.append(seg)
    ax.add_collection(LineCollection(segments, colors=OUTLINE, linewidths=1.0))


def question_title(record: MapRecord, q: int, width: int = 30) -> str:
    item = record.questions[q]
    return "\n".join(textwrap.wrap(f"[{item.family}] {item.question}", width))


def answers_text(record: MapRecord, q: int) -> str:
    item = record.questions[q]
    return (f"answer: {' / '.join(item.answers[:3])}\n"
            f"vanilla: {item.prediction or '-'}\nPyramidDrop: {item.prediction_drop or '-'}")


def label_question(ax: Axes, record: MapRecord, q: int) -> None:
    """The image panel of a row: the question above, the answers below, the named objects outlined."""
    image = record.images[q]
    show_image(ax, image)
    outline(ax, image, record.questions[q].evidence, record.grid)
    ax.set_title(question_title(record, q), fontsize=MIN_FONT)
    ax.set_xlabel(answers_text(record, q), fontsize=MIN_FONT)


def chosen(record: MapRecord, questions: Sequence[int] | None) -> list[int]:
    if not record.questions:
        raise NothingToDraw(f"the artefact of {record.model} holds no questions")
    picked = list(range(len(record.questions))) if questions is None else list(questions)
    for q in picked:
        if not 0 <= q < len(record.questions):
            raise ValueError(f"question {q} is outside [0, {len(record.questions) - 1}]")
    return picked


def recorded(record: MapRecord, layers: Sequence[int]) -> list[int]:
    """``layers`` that the artefact holds (the others reported missing)."""
    absent = [k for k in layers if k not in record.layers]
    if absent:
        note_missing(f"{record.model}: layers {absent} were not recorded (recorded: {record.layers})")
    present = [k for k in layers if k in record.layers]
    if not present:
        raise NothingToDraw(f"{record.model}: none of the layers {list(layers)} was recorded")
    return present


def share_text(record: MapRecord, q: int, values: np.ndarray) -> str:
    """``"31% on object (area 9%)"``: the image attention on the named objects against their area."""
    evidence = record.questions[q].evidence
    if not np.nan_to_num(np.asarray(values, np.float64)).sum() > 0:
        return EMPTY_MAP
    share = evidence_share(values, evidence)
    if np.isnan(share):
        return "no named object"
    return f"{100 * share:.0f}% on object\n(area {100 * len(evidence) / values.size:.0f}%)"


# ------------------------------------------------------------------ Fig. 1b
@styled
def attention_figure(
    record: MapRecord, layers: Sequence[int] = (2, 16), questions: Sequence[int] | None = None
) -> Figure:
    """PyramidDrop Fig. 1b: per question (rows) the image, then the query's attention over the
    image grid at each of ``layers`` (a shallow and a deep one), with the share that falls on the
    objects the question names."""
    picked = chosen(record, questions)
    layers = recorded(record, layers)
    fig, axes = new_figure(len(picked), 1 + len(layers), panel=(1.75, 2.1))
    spaced(fig)
    for row, q in enumerate(picked):
        image = record.images[q]
        label_question(axes[row, 0], record, q)
        maps, top = question_maps(record, q, layers)
        for col, (layer, shares) in enumerate(zip(layers, maps), start=1):
            ax = axes[row, col]
            show_image(ax, image)
            overlay_attention(ax, image, shares, top)
            outline(ax, image, record.questions[q].evidence, record.grid)
            ax.set_title(f"layer {layer}", fontsize=8)
            ax.set_xlabel(share_text(record, q, shares), fontsize=MIN_FONT)
    fig.suptitle(f"Attention of the {record.query!r} query over the image: {record.model}\n"
                 "(share of the image attention per token; one colour scale per row)", fontsize=8)
    return fig


@styled
def attention_layers_figure(record: MapRecord, question: int = 0, cols: int = 6) -> Figure:
    """The query's attention over the image grid in every recorded layer, for one question (a layer
    whose recorded map sums to 0 is captioned so, not left blank)."""
    chosen(record, [question])
    n = len(record.layers)
    cols = min(cols, max(2, math.ceil(math.sqrt(n))))  # a near-square grid, never a one-row strip
    rows = -(-n // cols)
    fig, axes = new_figure(rows, cols, panel=(1.15, 1.6), extra=0.3)
    spaced(fig)
    image = record.images[question]
    maps, top = question_maps(record, question, record.layers)
    for ax, layer, shares in zip(axes.flat, record.layers, maps):
        show_image(ax, image)
        overlay_attention(ax, image, shares, top)
        outline(ax, image, record.questions[question].evidence, record.grid)
        ax.set_title(f"layer {layer}", fontsize=MIN_FONT)
        ax.set_xlabel(share_text(record, question, shares), fontsize=MIN_FONT)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    item = record.questions[question]
    head = f"[{item.family}] {item.question} ({answers_text(record, question).replace(chr(10), '; ')})"
    fig.suptitle("\n".join([*textwrap.wrap(head, 95), f"{record.model}, attention of the {record.query!r} query in "
                                                       "every layer (one colour scale)"]), fontsize=8)
    return fig


# ------------------------------------------------------------------ Fig. 5
@styled
def retained_figure(record: MapRecord, questions: Sequence[int] | None = None) -> Figure:
    """PyramidDrop Fig. 5: per question (rows) the image, then the image tokens present in each
    PyramidDrop stage after the first (dropped ones darkened), the named objects outlined."""
    picked = chosen(record, questions)
    bounds = record.boundaries
    if not bounds:
        raise NothingToDraw(f"the artefact of {record.model} recorded no PyramidDrop boundaries")
    ends = [*bounds[1:], record.num_layers]
    fig, axes = new_figure(len(picked), 1 + len(bounds), panel=(1.75, 2.1))
    spaced(fig)
    for row, q in enumerate(picked):
        image = record.images[q]
        label_question(axes[row, 0], record, q)
        for stage, (start, end) in enumerate(zip(bounds, ends), start=1):
            ax = axes[row, stage]
            present = record.kept_at(q, stage)
            show_image(ax, image)
            dim_dropped(ax, image, present)
            outline(ax, image, record.questions[q].evidence, record.grid)
            ax.set_title(f"layers {start}-{end - 1}: {int(present.sum())} kept", fontsize=8)
            evidence = record.questions[q].evidence
            if evidence:
                on = int(present.ravel()[evidence].sum())
                ax.set_xlabel(f"{on}/{len(evidence)} object tokens kept", fontsize=MIN_FONT)
    params = " ".join(f"{k}={v}" for k, v in record.schedule.get("params", {}).items())
    fig.suptitle(f"Image tokens kept by PyramidDrop ({params}, of {record.grid ** 2}): {record.model}", fontsize=8)
    return fig
