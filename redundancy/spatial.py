"""Where the kept image tokens lie: per question, counts of the kept image tokens over the image's
rows and columns at each boundary, over LLaVA-NeXT's crops, and how many of them are sinks; summed
over a point's questions into its result row (``spatial``, written by :mod:`redundancy.sweep`).

    with apply_schedule(model, schedule) as trace, BoundaryStates(model, schedule) as states:
        model.generate(**inputs, ...)
    per_question = question_diagnostics(model, inputs, trace, states.hidden())
    row["spatial"] = summarise(per_question)

Everything is read after the prefill: the kept indices from the engine's trace (its records stay on
the device until read), the sinks from the hidden states leaving each boundary's ranking layer
(layer ``K-1``, kept by a forward hook as a reference, no computation inside the layer loop), with
the engine's own rule :func:`redundancy.ranking.sink_mask` over the image tokens present there.

Grids (the image-token layout of each family, raster order):

* LLaVA-1.5: one ``side x side`` grid per image (``image_size // patch_size``);
* LLaVA-NeXT: the base image's ``g x g`` grid, then the high-resolution crops stitched and unpadded
  into one ``h' x (w' + 1)`` grid whose last column holds the newline tokens; crops are counted as
  ``0`` (base image), ``1..`` (the tiles of the high-resolution grid, raster order) and ``-1``
  (newline tokens);
* Qwen2-VL: the merged ``(h / m) x (w / m)`` grid of each frame (``m``: spatial_merge_size).

A grid is named ``"HxW"``; counts of images with different grids stay apart (the row holds one
``H x W`` count array per grid). A sequence whose layout is unknown is one ``1 x N`` grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from redundancy.models import adapter_for
from redundancy.ranking import SINK_NORM_RATIO, sink_mask
from redundancy.schedule import DropSchedule

SPATIAL_VERSION = 1


@dataclass(frozen=True)
class ImageLayout:
    """Where each image token of one sample lies (index: the token's original image-token index)."""

    grids: list[str]
    """Per token, its grid ``"HxW"``."""
    cells: np.ndarray
    """Per token, its row-major cell in that grid."""
    crops: np.ndarray | None = None
    """Per token, its LLaVA-NeXT crop (0 base, 1.. tiles, -1 newline); None for other families."""


def grid_name(height: int, width: int) -> str:
    return f"{height}x{width}"


def grid_shape(name: str) -> tuple[int, int]:
    h, w = name.split("x")
    return int(h), int(w)


def _raster(height: int, width: int, copies: int = 1) -> tuple[list[str], np.ndarray]:
    return [grid_name(height, width)] * (height * width * copies), np.tile(np.arange(height * width), copies)


def _sequence(n: int) -> ImageLayout:
    names, cells = _raster(1, n)
    return ImageLayout(names, cells)


def _llava(model: Any, n_image: Sequence[int]) -> list[ImageLayout]:
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    out = []
    for n in n_image:
        if n > 0 and n % (side * side) == 0:
            out.append(ImageLayout(*_raster(side, side, n // (side * side))))
        elif n > 0 and math.isqrt(n) ** 2 == n:
            out.append(ImageLayout(*_raster(math.isqrt(n), math.isqrt(n))))
        else:
            out.append(_sequence(n))
    return out


def _next_image(height: int, width: int, cfg: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """One LLaVA-NeXT image: its base grid, then its unpadded high-resolution grid with the newline column."""
    from transformers.image_processing_utils import select_best_resolution

    from redundancy.models.llava_next import next_image_layout

    size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    (g, _), (h, w1) = next_image_layout(height, width, size, patch, cfg.image_grid_pinpoints)
    best_h, best_w = select_best_resolution((height, width), cfg.image_grid_pinpoints)
    full_h, full_w = best_h // size * g, best_w // size * g
    w = w1 - 1
    top, left = (full_h - h) // 2, (full_w - w) // 2  # what unpadding cut from each side
    rows, cols = np.divmod(np.arange(h * w1), w1)
    tiles = ((rows + top) // g) * (full_w // g) + (cols + left) // g + 1
    crops = np.concatenate([np.zeros(g * g, np.int64), np.where(cols == w, -1, tiles)])
    names = [grid_name(g, g)] * (g * g) + [grid_name(h, w1)] * (h * w1)
    return names, np.concatenate([np.arange(g * g), np.arange(h * w1)]), crops


def _pack(
    n_image: Sequence[int], images: Sequence[tuple[list[str], np.ndarray, np.ndarray | None]]
) -> list[ImageLayout]:
    """Per row, its images' layouts in batch order (a row whose count does not match: a sequence)."""
    out, it = [], iter(images)
    for n in n_image:
        names: list[str] = []
        cells, crops = [], []
        while len(names) < n:
            image = next(it, None)
            if image is None:
                break
            names += image[0]
            cells.append(image[1])
            crops.append(image[2])
        if len(names) != n or not cells:
            out.append(_sequence(n))
            continue
        present = [c for c in crops if c is not None]
        crop = np.concatenate(present) if len(present) == len(crops) else None
        out.append(ImageLayout(names, np.concatenate(cells), crop))
    return out


def image_layouts(model: Any, inputs: Mapping[str, Any], n_image: Sequence[int]) -> list[ImageLayout]:
    """Per sample of ``inputs`` (the processor's batch), where each of its ``n_image`` image tokens lies."""
    family = adapter_for(model).family
    if family == "llava_next" and inputs.get("image_sizes") is not None:
        sizes = torch.as_tensor(inputs["image_sizes"]).tolist()
        return _pack(n_image, [_next_image(int(h), int(w), model.config) for h, w in sizes])
    if family == "qwen2_vl" and inputs.get("image_grid_thw") is not None:
        merge = int(model.config.vision_config.spatial_merge_size)
        images = []
        for t, h, w in torch.as_tensor(inputs["image_grid_thw"]).tolist():
            names, cells = _raster(h // merge, w // merge, t)
            images.append((names, cells, None))
        return _pack(n_image, images)
    if family == "llava":
        return _llava(model, n_image)
    return [_sequence(n) for n in n_image]


# ------------------------------------------------------------------ what the prefill held
class BoundaryStates:
    """Keeps a reference to the hidden states leaving each boundary's ranking layer (``K-1``) in the
    prefill (the first forward inside the block: until the output head first runs), in that stage's
    layout. A first stage the grid runner replayed (:class:`redundancy.grid.SharedPrefix`) did not run
    its layers in the prefill: its states are the recorded ones (``replayed``)."""

    def __init__(self, model: Any, schedule: DropSchedule, enabled: bool = True) -> None:
        self.model, self.schedule, self.enabled = model, schedule, enabled
        self.states: dict[int, torch.Tensor] = {}
        self.prefilled = False
        self._hooks: list[Any] = []

    def __enter__(self) -> BoundaryStates:
        if self.enabled:
            layers = adapter_for(self.model).layers
            self._hooks.append(self.model.get_output_embeddings().register_forward_hook(self._prefilled))
            for b, k in enumerate(self.schedule.boundaries):
                self._hooks.append(layers[k - 1].register_forward_hook(functools.partial(self._keep, b)))
        return self

    def _keep(self, b: int, module: Any, args: Any, out: Any) -> None:
        """A forward hook that returns nothing: the layer's output passes unchanged."""
        if not self.prefilled and b not in self.states:
            self.states[b] = out[0] if isinstance(out, tuple) else out

    def _prefilled(self, module: Any, args: Any, out: Any) -> None:
        self.prefilled = True

    def __exit__(self, *exc: object) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def hidden(self, replayed: Mapping[int, torch.Tensor] | None = None) -> list[torch.Tensor | None]:
        """Per boundary, the states leaving its ranking layer (``replayed``: layer -> recorded states)."""
        out = []
        for b, k in enumerate(self.schedule.boundaries):
            state = self.states.get(b)
            if state is None and replayed is not None:
                state = replayed.get(k)
            out.append(state)
        return out


def _zeros(layout: ImageLayout) -> dict[str, np.ndarray]:
    return {name: np.zeros(grid_shape(name)[0] * grid_shape(name)[1], np.int64) for name in dict.fromkeys(layout.grids)}


def _count(layout: ImageLayout, tokens: np.ndarray) -> dict[str, Any]:
    """Counts of ``tokens`` (image-token indices) per grid cell (flat) and per crop."""
    grids = _zeros(layout)
    names = np.asarray(layout.grids, dtype=object)
    for name, cells in grids.items():
        mine = tokens[names[tokens] == name] if len(tokens) else tokens
        np.add.at(cells, layout.cells[mine], 1)
    out: dict[str, Any] = {"grids": {k: v.tolist() for k, v in grids.items()}, "tokens": int(len(tokens))}
    if layout.crops is not None:
        crops = layout.crops[tokens]
        out["crops"] = {str(c): int((crops == c).sum()) for c in sorted(set(layout.crops.tolist()))}
    return out


def question_diagnostics(
    model: Any, inputs: Mapping[str, Any], trace: Any, hidden: Sequence[torch.Tensor | None],
) -> list[dict[str, Any]]:
    """Per sample of the batch ``inputs`` that ``trace`` (``apply_schedule(..., trace=True)``) recorded:
    the counts of its image tokens (``image``) and, per boundary, of the kept ones over its grids' cells
    and crops, the sinks among the kept tokens and among the tokens present at the ranking layer
    (``hidden``: :meth:`BoundaryStates.hidden`; None: not counted)."""
    n_image = list(trace.n_image)
    layouts = image_layouts(model, inputs, n_image)
    records = trace.boundaries  # copies the kept indices to the host
    ids, valid = inputs["input_ids"], inputs["attention_mask"].bool()
    is_img = (ids == adapter_for(model).image_token_id) & valid
    ordinal = is_img.long().cumsum(1) - 1
    sinks: list[list[np.ndarray] | None] = []
    for b, state in enumerate(hidden):
        if state is None or b >= len(trace.slots):
            sinks.append(None)
            continue
        slots = trace.slots[b].to(ids.device)
        present = is_img.gather(1, slots.clamp(min=0)) & (slots >= 0)
        mask = sink_mask(state, present).cpu()
        place = ordinal.gather(1, slots.clamp(min=0)).cpu()
        sinks.append([place[i][mask[i]].numpy() for i in range(len(n_image))])
    out = []
    for i, layout in enumerate(layouts):
        entry: dict[str, Any] = {"image": _count(layout, np.arange(n_image[i])),
                                 "layers": [int(r.layer) for r in records], "boundaries": []}
        for b, record in enumerate(records):
            kept = record.kept[i].numpy().astype(np.int64)
            counts = _count(layout, kept)
            sink = sinks[b]
            if sink is not None:
                found = sink[i]
                counts["sinks"] = int(np.isin(kept, found).sum())
                counts["sinks_present"] = int(len(found))
            entry["boundaries"].append(counts)
        out.append(entry)
    return out


# ------------------------------------------------------------------ a point's row
def _add(total: Any, part: Any) -> Any:
    """``total + part`` for per-question counts: nested dicts key by key, lists element by element."""
    if total is None or part is None:
        return part if total is None else total
    if isinstance(part, dict):
        return {k: _add(total.get(k), part.get(k)) for k in {**total, **part}}
    if isinstance(part, list):
        return (np.asarray(total) + np.asarray(part)).tolist()
    return total + part


def summarise(questions: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
    """The row's ``spatial`` field: the per-question counts summed, grids as ``H x W`` arrays with their
    row and column sums (``rows``, ``cols``); None unless every question was counted."""
    counted = [q for q in questions if q is not None]
    if not questions or len(counted) < len(questions):
        return None
    layers = list(counted[0]["layers"])
    image: Any = None
    boundaries: list[Any] = [None] * len(layers)
    for q in counted:
        if list(q["layers"]) != layers:
            return None
        image = _add(image, q["image"])
        boundaries = [_add(t, b) for t, b in zip(boundaries, q["boundaries"])]
    return {"version": SPATIAL_VERSION, "questions": len(questions), "sink_norm_ratio": SINK_NORM_RATIO,
            "image": _shape(image), "boundaries": [{"layer": k, **_shape(b)} for k, b in zip(layers, boundaries)]}


def _shape(part: dict[str, Any]) -> dict[str, Any]:
    grids = {name: np.asarray(flat, np.int64).reshape(grid_shape(name)) for name, flat in part["grids"].items()}
    return {**part, "grids": {k: v.tolist() for k, v in grids.items()},
            "rows": {k: v.sum(1).tolist() for k, v in grids.items()},
            "cols": {k: v.sum(0).tolist() for k, v in grids.items()}}


# ------------------------------------------------------------------ reading rows
def main_grid(part: Mapping[str, Any]) -> str:
    """The grid holding most tokens of a row's ``spatial`` part (the image's, for LLaVA-1.5)."""
    return max(part["grids"], key=lambda k: int(np.sum(part["grids"][k])))


def _bottom_weights(height: int) -> np.ndarray:
    """Per grid row, how much of it is the bottom half: 0 above the middle, 1 below, 0.5 on a middle row."""
    return np.clip(np.arange(height) + 1 - height / 2, 0, 1)


def bottom_share(part: Mapping[str, Any], grid: str | None = None) -> float:
    """Share of the counted tokens of ``grid`` (default :func:`main_grid`) in its bottom half of rows
    (an odd middle row counts half to each side)."""
    grid = grid or main_grid(part)
    rows = np.asarray(part["rows"][grid], float)
    total = rows.sum()
    return float((rows * _bottom_weights(len(rows))).sum() / total) if total else math.nan


def question_numbers(entry: Mapping[str, Any]) -> dict[str, list[Any]]:
    """What a per-sample record keeps of one question's counts (:func:`question_diagnostics`), for tests
    paired by question: per boundary, its kept tokens in the bottom half of its main grid
    (``kept_bottom``), its kept sinks (``kept_sinks``) and the sinks present at the ranking layer
    (``present_sinks``; None where sinks were not counted)."""
    grid = main_grid(entry["image"])
    h, w = grid_shape(grid)
    weights = np.repeat(_bottom_weights(h), w)
    return {
        "kept_bottom": [float(weights @ np.asarray(b["grids"].get(grid, np.zeros(h * w)), float))
                        for b in entry["boundaries"]],
        "kept_sinks": [b.get("sinks") for b in entry["boundaries"]],
        "present_sinks": [b.get("sinks_present") for b in entry["boundaries"]],
    }


def sink_share(part: Mapping[str, Any]) -> float:
    """Share of a boundary's kept tokens that are sinks (NaN when not counted)."""
    if "sinks" not in part or not part.get("tokens"):
        return math.nan
    return part["sinks"] / part["tokens"]
