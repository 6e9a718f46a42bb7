"""microvqa: a procedurally generated VQA benchmark of shapes, colours and glyphs.

    python -m redundancy.micro.microvqa split=test n=600 out=redundancy/assets/microvqa/test
    python -m redundancy.micro.microvqa split=train n=200000 out=data/microvqa/train gen.max_objects=3

Each image (``image_size`` px square, default 96 = a 24x24 grid of 4-px patches,
576 image tokens as in LLaVA-1.5) shows 1..``max_objects`` non-overlapping
objects on a plain grey background: a shape (circle, square, triangle, diamond,
cross) in one of eight colours, 12-36 px wide, some carrying a glyph (a digit or
letter drawn from the 5x7 bitmap font below at 2x, black or white, whichever
contrasts more with the object). Everything is drawn with numpy on the pixel
grid, without anti-aliasing or system fonts, so pixels are identical on every
machine (PNG bytes may differ between zlib builds; the pixels do not). One
question per image, from four families:

===========  ==========================================================  ===================
family       example question -> answer                                  answers (chance)
===========  ==========================================================  ===================
color        What color is the triangle? -> ``red``                       8 colours (1/8)
reading      What is written on the blue square? -> ``k``                 25 glyphs (1/25)
spatial      Is the red circle left or right of the green cross? ->       left/right,
             ``left`` (or above/below) | What shape is above the          above/below (1/2);
             white diamond? -> ``circle``                                 5 shapes (1/5)
count        How many circles are there? | How many objects are there?    1..max_objects (1/6)
             -> ``3``
===========  ==========================================================  ===================

Answers are single lowercase words, already in :func:`redundancy.data.normalize_answer`
form: colour and shape names, glyphs as lowercase characters, ``left``/``right``/
``above``/``below``, and counts as digits (the normaliser maps ``"three"`` to ``"3"``).
Every object a question names is unique in its image (a shape for ``color``, a
colour + shape pair otherwise); spatial relations hold along the dominant axis
(``|dx| > |dy|`` for left/right) with the two boxes disjoint along it, and for
"what shape is left of X" no other object's centre lies left of X's centre.
Answers are balanced: each subtype draws its answer from a shuffled bag of its
vocabulary (refilled when empty), then builds a scene that has that answer, so
no family can be answered from the question alone better than the chance above
(``spatial``: 0.35 overall, half relations, half neighbours).

Splits never share an image: every scene hashes (blake2b of its sorted object
list) into one of 20 buckets -- 18 train, 1 val, 1 test -- and a split only keeps
scenes of its own buckets. The split also seeds its own random stream, so
``generate(cfg, split)`` is one fixed, endless stream per (config, split).

Written to disk in the local format of :mod:`redundancy.data`: ``images/NNNNNN.png``
(RGB), ``questions.jsonl`` (``question_id`` = ``"<split>-NNNNNN"``, ``image``,
``question``, ``answers`` = [answer], ``family``, plus ``subtype``, ``objects``:
``[{shape, color, glyph, box: [x, y, size]}]`` in reading order, and ``evidence``:
indices of the objects the answer depends on; :func:`patch_indices` maps a box to
image-token indices) and ``meta.json`` (the :class:`GenConfig`, split and count
that regenerate the directory). Prompt templates ("Answer with a single word.")
belong to the trainer / evaluator, not to the data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from itertools import islice
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from PIL import Image
from tqdm import tqdm

from redundancy.cli import run_entry
from redundancy.data import QUESTIONS_FILE

# ---------------------------------------------------------------------------------------------
# Vocabulary

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (250, 140, 20),
    "yellow": (250, 225, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "purple": (150, 60, 200),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
BACKGROUND = (128, 128, 128)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds", "cross": "crosses"}
DIRECTIONS = ("left", "right", "above", "below")
FAMILIES = ("color", "reading", "spatial", "count")
SUBTYPES = {"color": ("color",), "reading": ("reading",), "spatial": ("relation", "neighbor"),
            "count": ("count_shape", "count_all")}  # fmt: skip
ALL_SUBTYPES = tuple(t for ts in SUBTYPES.values() for t in ts)
SPLITS = ("train", "val", "test")
BUCKETS = {"train": range(18), "val": range(18, 19), "test": range(19, 20)}  # of 20 hash buckets

# 5x7 bitmap font. Left out: A (an article: the normaliser deletes it), and the letters a
# 5x7 glyph confuses with a digit or each other (B/8, G/6, I/1, O/0, Q, S/5, Z/2, J, V, W).
_FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110",
    "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111",
    "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010",
    "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110",
    "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110",
    "9": "01110 10001 10001 01111 00001 00010 01100",
    "C": "01110 10001 10000 10000 10000 10001 01110",
    "D": "11110 10001 10001 10001 10001 10001 11110",
    "E": "11111 10000 10000 11110 10000 10000 11111",
    "F": "11111 10000 10000 11110 10000 10000 10000",
    "H": "10001 10001 10001 11111 10001 10001 10001",
    "K": "10001 10010 10100 11000 10100 10010 10001",
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001",
    "N": "10001 10001 11001 10101 10011 10001 10001",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110",
    "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 01010 00100 00100 00100 00100",
}
GLYPHS = tuple(_FONT)  # as drawn (uppercase); answers are ``glyph.lower()``
GLYPH_SCALE = 2
GLYPH_H, GLYPH_W = 7 * GLYPH_SCALE, 5 * GLYPH_SCALE  # 14 x 10 px
GAP = 2  # px between object boxes


def _luminance(rgb: Sequence[int]) -> float:
    """WCAG relative luminance of an sRGB colour."""
    lin = [(c / 255) / 12.92 if c <= 10 else ((c / 255 + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: Sequence[int], b: Sequence[int]) -> float:
    """WCAG contrast ratio (1..21) of two colours."""
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


# Glyph ink per object colour: black or white, whichever contrasts more.
INK = {name: max(((0, 0, 0), (255, 255, 255)), key=lambda ink: contrast(ink, rgb)) for name, rgb in COLORS.items()}


# ---------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class GenConfig:
    """What the generator draws. Sizes in px; ``families`` maps a family to its sampling weight
    (a missing family or weight 0 turns it off). The curriculum knob: e.g. start with
    ``GenConfig(max_objects=1, min_size=28, families={"color": 1.0})`` and grow."""

    image_size: int = 96  # the vision tower's input side
    patch: int = 4  # vision patch side: (image_size / patch)^2 image tokens
    min_objects: int = 1
    max_objects: int = 6
    min_size: int = 12  # object box side
    max_size: int = 36
    glyph_prob: float = 0.4  # chance an object carries a glyph, when one fits (a reading referent always does)
    families: dict[str, float] = field(
        default_factory=lambda: {"color": 1.0, "reading": 1.0, "spatial": 1.0, "count": 1.0}
    )
    # weights of subtypes within their family (a missing subtype weighs 1, 0 turns it off);
    # empty: each family's subtypes in turn, from a shuffled bag, as the shipped splits are drawn
    subtypes: dict[str, float] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.image_size % self.patch:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch={self.patch}")
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if not 4 <= self.min_size <= self.max_size <= self.image_size:
            raise ValueError(f"need 4 <= min_size <= max_size <= image_size, got {self.min_size}, {self.max_size}")
        if not 0.0 <= self.glyph_prob <= 1.0:
            raise ValueError(f"glyph_prob={self.glyph_prob} is not in [0, 1]")
        unknown = set(self.families) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown families {sorted(unknown)}; choose from {FAMILIES}")
        if any(w < 0 for w in self.families.values()) or sum(self.families.values()) <= 0:
            raise ValueError(f"family weights must be >= 0 with a positive sum, got {self.families}")
        if set(self.subtypes) - set(ALL_SUBTYPES) or any(w < 0 for w in self.subtypes.values()):
            raise ValueError(f"subtype weights {self.subtypes} must be >= 0 and among {ALL_SUBTYPES}")
        for f in self.families:
            if self.weight(f) > 0 and not any(self.subtypes.get(t, 1.0) > 0 for t in SUBTYPES[f]):
                raise ValueError(f"family {f!r} has weight {self.weight(f)} but all its subtypes weigh 0")
        if self.weight("spatial") and self.max_objects < 2:
            raise ValueError("the spatial family needs max_objects >= 2")
        if self.weight("reading") and not glyph_shapes(self.max_size):
            raise ValueError(f"no shape up to max_size={self.max_size} px can hold a {GLYPH_W}x{GLYPH_H} glyph")

    def weight(self, family: str) -> float:
        return float(self.families.get(family, 0.0))


def answer_vocabulary(cfg: GenConfig) -> dict[str, tuple[str, ...]]:
    """Every answer each family can produce under ``cfg``."""
    counts = tuple(str(k) for k in range(1, cfg.max_objects + 1))
    return {
        "color": tuple(COLORS),
        "reading": tuple(g.lower() for g in GLYPHS),
        "spatial": DIRECTIONS + SHAPES,
        "count": counts,
    }


def question_words() -> tuple[str, ...]:
    """Every word the question templates can use (lowercase; punctuation excluded),
    for building a closed-vocabulary tokenizer."""
    template = "what color is the written on left or right of above below shape how many are there objects"
    words = set(template.split()) | set(COLORS) | set(SHAPES) | set(PLURAL.values())
    return tuple(sorted(words))


# ---------------------------------------------------------------------------------------------
# Drawing


@dataclass(frozen=True)
class Obj:
    """One object: its box is ``[x, x + size) x [y, y + size)`` in image pixels."""

    shape: str
    color: str
    glyph: str | None
    x: int
    y: int
    size: int

    def center(self) -> tuple[float, float]:
        return self.x + self.size / 2, self.y + self.size / 2

    def to_json(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "glyph": self.glyph, "box": [self.x, self.y, self.size]}


@cache
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean ``[size, size]`` mask of a shape filling its box, sampled at pixel centres."""
    v, u = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5  # [size, size] each, in (-0.5, 0.5)
    masks = {
        "circle": u**2 + v**2 <= 0.25,
        "square": np.ones((size, size), bool),
        "triangle": np.abs(u) <= (v + 0.5) / 2,  # apex top-centre, base along the bottom
        "diamond": np.abs(u) + np.abs(v) <= 0.5,
        "cross": (np.abs(u) <= 0.2) | (np.abs(v) <= 0.2),
    }
    mask = masks[shape]
    mask.setflags(write=False)  # cached: shared by every caller
    return mask


@cache
def glyph_bitmap(glyph: str) -> np.ndarray:
    """Boolean ``[14, 10]`` bitmap of a glyph (the 5x7 font at 2x)."""
    rows = np.array([[c == "1" for c in row] for row in _FONT[glyph].split()])  # [7, 5]
    bitmap = np.kron(rows, np.ones((GLYPH_SCALE, GLYPH_SCALE), bool))
    bitmap.setflags(write=False)  # cached: shared by every caller
    return bitmap


def _glyph_origin(shape: str, size: int) -> tuple[int, int]:
    """Top-left ``(row, col)`` of the glyph inside the object's box (centred; lower in a triangle)."""
    cy = size * (0.66 if shape == "triangle" else 0.5)
    return int(np.floor(cy - GLYPH_H / 2 + 0.5)), int(np.floor(size / 2 - GLYPH_W / 2 + 0.5))


@cache
def glyph_fits(shape: str, size: int) -> bool:
    """Whether a glyph, plus a 1-px rim of object colour, lies inside the shape."""
    r, c = _glyph_origin(shape, size)
    if r < 1 or c < 1 or r + GLYPH_H + 1 > size or c + GLYPH_W + 1 > size:
        return False
    return bool(shape_mask(shape, size)[r - 1 : r + GLYPH_H + 1, c - 1 : c + GLYPH_W + 1].all())


@cache
def glyph_min_size(shape: str) -> int | None:
    """Smallest box side from which on a glyph always fits the shape (None: never below 64 px)."""
    fits = [glyph_fits(shape, s) for s in range(64)]
    for s in range(64):
        if all(fits[s:]):
            return s
    return None


def glyph_shapes(max_size: int) -> tuple[str, ...]:
    """Shapes that can carry a glyph at some size <= ``max_size``."""
    return tuple(s for s in SHAPES if (m := glyph_min_size(s)) is not None and m <= max_size)


POSITION_BINS = 12  # the row / column targets: the patch's grid row / column in 12 bins
PATCH_TARGETS = {
    "color": len(COLORS) + 1,
    "shape": len(SHAPES) + 1,
    "glyph": len(GLYPHS) + 1,
    "center": 2,  # 1 on the patch holding an object's box centre (one per object: counting)
    "row": POSITION_BINS + 1,  # the patch's own position, on object patches (spatial relations)
    "col": POSITION_BINS + 1,
    "x": 1,  # the object's box centre, on all its patches: regressed, not classified (spatial relations)
    "y": 1,
    # 1 on the patches of the object whose box centre lies nearest that side of the image (the
    # first object from the left, right, top, bottom; 0 on every other object patch): where an
    # object stands among the others, which "what shape is left of X?" asks about
    "edge_left": 2,
    "edge_right": 2,
    "edge_above": 2,
    "edge_below": 2,
}
SPARSE_TARGETS = ("glyph", "center")  # set on a few object patches only (0 elsewhere)
REGRESSION_TARGETS = ("x", "y")  # labels 1 + the coordinate in px (0 on the background); one output each


def patch_targets(objects: Sequence[Obj], image_size: int, patch: int, min_cover: float = 0.2) -> np.ndarray:
    """Dense per-patch labels ``[len(PATCH_TARGETS), (image_size / patch) ** 2]`` (raster
    order, rows in ``PATCH_TARGETS`` order) for vision pretraining: the colour, shape and
    glyph of the object covering most of each patch (at least ``min_cover`` of it; later
    objects win ties as in :func:`render`), and the glyph on the patches its glyph box
    covers; 0 for background / no glyph, else 1 + index in ``COLORS`` / ``SHAPES`` /
    ``GLYPHS``. ``center`` is 1 on the patch holding each object's box centre; ``row`` and
    ``col`` are 1 + the patch's grid row / column in ``POSITION_BINS`` bins, on object
    patches (0 on the background); ``x`` and ``y`` are 1 + the owning object's box centre
    (in px, rounded down) on each of its patches, the same on all of them; ``edge_<side>`` is
    1 on the patches of the objects whose centre is the first from that side."""
    grid = image_size // patch
    centers = np.array([o.center() for o in objects]).reshape(-1, 2)
    edges = [
        centers[:, 0] == centers[:, 0].min(initial=np.inf),
        centers[:, 0] == centers[:, 0].max(initial=-np.inf),
        centers[:, 1] == centers[:, 1].min(initial=np.inf),
        centers[:, 1] == centers[:, 1].max(initial=-np.inf),
    ]
    out = np.zeros((len(PATCH_TARGETS), grid, grid), np.int64)
    cover = np.full((grid, grid), min_cover)
    colors, shapes = list(COLORS), list(SHAPES)
    for k, o in enumerate(objects):
        mask = np.zeros((image_size, image_size))
        mask[o.y : o.y + o.size, o.x : o.x + o.size] = shape_mask(o.shape, o.size)
        frac = mask.reshape(grid, patch, grid, patch).mean(axis=(1, 3))
        win = frac >= cover
        cover = np.where(win, frac, cover)
        out[0][win] = 1 + colors.index(o.color)
        out[1][win] = 1 + shapes.index(o.shape)
        out[2][win] = 0
        cx, cy = o.center()
        out[6][win], out[7][win] = 1 + int(cx), 1 + int(cy)
        for row, edge in enumerate(edges, start=8):
            out[row][win] = int(edge[k])
        if o.glyph:  # the glyph label sits on the patches its glyph box covers
            r, c = _glyph_origin(o.shape, o.size)
            ink = np.zeros((image_size, image_size))
            ink[o.y + r : o.y + r + GLYPH_H, o.x + c : o.x + c + GLYPH_W] = 1
            on_glyph = ink.reshape(grid, patch, grid, patch).mean(axis=(1, 3)) >= min_cover
            out[2][on_glyph] = 1 + GLYPHS.index(o.glyph)
        out[3][min(int(cy) // patch, grid - 1), min(int(cx) // patch, grid - 1)] = 1
    fg = out[0] > 0
    out[3] &= fg
    rows = np.arange(grid)[:, None] * POSITION_BINS // grid + 1
    out[4] = np.where(fg, np.broadcast_to(rows, (grid, grid)), 0)
    out[5] = np.where(fg, np.broadcast_to(rows.T, (grid, grid)), 0)
    return out.reshape(len(PATCH_TARGETS), -1)


def render(objects: Sequence[Obj], image_size: int) -> np.ndarray:
    """The scene as a ``[image_size, image_size, 3]`` uint8 RGB array."""
    img = np.empty((image_size, image_size, 3), np.uint8)
    img[:] = BACKGROUND
    for o in objects:
        box = img[o.y : o.y + o.size, o.x : o.x + o.size]  # [size, size, 3] view
        box[shape_mask(o.shape, o.size)] = COLORS[o.color]
        if o.glyph is not None:
            r, c = _glyph_origin(o.shape, o.size)
            box[r : r + GLYPH_H, c : c + GLYPH_W][glyph_bitmap(o.glyph)] = INK[o.color]
    return img


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, "RGB").save(buf, format="PNG", optimize=True)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Scenes and questions


@dataclass(frozen=True)
class Example:
    """One generated image with its question. ``evidence`` indexes ``objects``."""

    image: np.ndarray  # [H, W, 3] uint8
    question: str
    answer: str
    family: str
    subtype: str
    objects: tuple[Obj, ...]
    evidence: tuple[int, ...]

    def record(self, question_id: str, image: str) -> dict[str, Any]:
        """The ``questions.jsonl`` line (see :mod:`redundancy.data`)."""
        return {
            "question_id": question_id,
            "image": image,
            "question": self.question,
            "answers": [self.answer],
            "family": self.family,
            "subtype": self.subtype,
            "objects": [o.to_json() for o in self.objects],
            "evidence": list(self.evidence),
        }


@dataclass
class _Spec:
    """An object before placement."""

    shape: str
    color: str
    glyph: str | None
    size: int


@dataclass
class _Scene:
    """Objects to place, how (``layout`` in the frame where the relation is "left"), and the question."""

    specs: list[_Spec]
    question: str
    answer: str
    evidence: list[int]
    layout: str = "free"  # free | pair: 0 is left of 1 | neighbor: 1 is the only object left of 0
    direction: str = "left"  # maps the "left" frame to the asked direction


class _Bag:
    """Draws items without replacement, reshuffling when empty: near-exact balance on any prefix."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items: list[Any] = list(items)
        self.left: list[Any] = []

    def draw(self, rng: np.random.Generator) -> Any:
        if not self.left:
            self.left = [self.items[i] for i in rng.permutation(len(self.items))]
        return self.left.pop()


def _choice(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


class _SceneSampler:
    """Plans (family, subtype, answer) and samples scene specs that have that answer."""

    def __init__(self, cfg: GenConfig) -> None:
        self.cfg = cfg
        self.families = [f for f in FAMILIES if cfg.weight(f) > 0]
        weights = np.array([cfg.weight(f) for f in self.families])
        self.p = weights / weights.sum()
        self.subtypes = {f: _Bag(SUBTYPES[f]) for f in self.families}
        # with subtype weights: each family's subtypes drawn by weight (GenConfig.subtypes), not in turn
        within = {f: np.array([cfg.subtypes.get(t, 1.0) for t in SUBTYPES[f]]) for f in self.families}
        self.subtype_p = {f: w / w.sum() for f, w in within.items()}
        self.answers = {
            "color": _Bag(tuple(COLORS)),
            "reading": _Bag(GLYPHS),
            "relation": _Bag(DIRECTIONS),
            "neighbor": _Bag(SHAPES),
            "neighbor_dir": _Bag(DIRECTIONS),
            "count_shape": _Bag(range(1, cfg.max_objects + 1)),
            "count_all": _Bag(range(cfg.min_objects, cfg.max_objects + 1)),
        }
        self.glyph_shapes = glyph_shapes(cfg.max_size)

    def plan(self, rng: np.random.Generator) -> tuple[str, str, Any]:
        family = self.families[int(rng.choice(len(self.families), p=self.p))]
        if self.cfg.subtypes:
            subtype = SUBTYPES[family][int(rng.choice(len(SUBTYPES[family]), p=self.subtype_p[family]))]
        else:
            subtype = self.subtypes[family].draw(rng)
        return family, subtype, self.answers[subtype].draw(rng)

    # -- objects

    def _size(self, rng: np.random.Generator, shape: str, glyph: str | None) -> int:
        lo = self.cfg.min_size if glyph is None else max(self.cfg.min_size, glyph_min_size(shape) or 0)
        return int(rng.integers(lo, self.cfg.max_size + 1))

    def _spec(self, rng: np.random.Generator, shape: str, color: str, glyph: str | None = None) -> _Spec:
        """An object; without a given glyph it gets a random one with ``glyph_prob`` (when one fits)."""
        if glyph is None and shape in self.glyph_shapes and rng.random() < self.cfg.glyph_prob:
            glyph = _choice(rng, GLYPHS)
        return _Spec(shape, color, glyph, self._size(rng, shape, glyph))

    def _others(
        self, rng: np.random.Generator, n: int, shapes: Sequence[str] = SHAPES, avoid: Sequence[tuple[str, str]] = ()
    ) -> list[_Spec]:
        """``n`` distractors with a shape in ``shapes`` and no (shape, colour) pair in ``avoid``."""
        pairs = [(s, c) for s in shapes for c in COLORS if (s, c) not in avoid]
        return [self._spec(rng, *_choice(rng, pairs)) for _ in range(n)]

    def _n(self, rng: np.random.Generator, at_least: int = 1) -> int:
        return int(rng.integers(max(self.cfg.min_objects, at_least), self.cfg.max_objects + 1))

    # -- one scene per subtype

    def scene(self, rng: np.random.Generator, subtype: str, answer: Any) -> _Scene:
        build: dict[str, Callable[[np.random.Generator, Any], _Scene]] = {
            "color": self._color, "reading": self._reading, "relation": self._relation,
            "neighbor": self._neighbor, "count_shape": self._count_shape,
            "count_all": self._count_all}  # fmt: skip
        return build[subtype](rng, answer)

    def _color(self, rng: np.random.Generator, color: str) -> _Scene:
        shape = _choice(rng, SHAPES)
        others = self._others(rng, self._n(rng) - 1, [s for s in SHAPES if s != shape])
        return _Scene([self._spec(rng, shape, color), *others], f"What color is the {shape}?", color, [0])

    def _reading(self, rng: np.random.Generator, glyph: str) -> _Scene:
        shape, color = _choice(rng, self.glyph_shapes), _choice(rng, tuple(COLORS))
        others = self._others(rng, self._n(rng) - 1, avoid=[(shape, color)])
        q = f"What is written on the {color} {shape}?"
        return _Scene([self._spec(rng, shape, color, glyph), *others], q, glyph.lower(), [0])

    def _relation(self, rng: np.random.Generator, direction: str) -> _Scene:
        pairs = [(s, c) for s in SHAPES for c in COLORS]
        i, j = rng.choice(len(pairs), size=2, replace=False)
        (s1, c1), (s2, c2) = pairs[i], pairs[j]
        others = self._others(rng, self._n(rng, 2) - 2, avoid=[pairs[i], pairs[j]])
        axis = "left or right of" if direction in ("left", "right") else "above or below"
        q = f"Is the {c1} {s1} {axis} the {c2} {s2}?"
        specs = [self._spec(rng, s1, c1), self._spec(rng, s2, c2), *others]
        return _Scene(specs, q, direction, [0, 1], layout="pair", direction=direction)

    def _neighbor(self, rng: np.random.Generator, shape: str) -> _Scene:
        direction = self.answers["neighbor_dir"].draw(rng)
        ref = (_choice(rng, SHAPES), _choice(rng, tuple(COLORS)))
        target = (shape, _choice(rng, [c for c in COLORS if (shape, c) != ref]))
        others = self._others(rng, self._n(rng, 2) - 2, avoid=[ref])
        where = {"left": "left of", "right": "right of", "above": "above", "below": "below"}[direction]
        q = f"What shape is {where} the {ref[1]} {ref[0]}?"
        specs = [self._spec(rng, *ref), self._spec(rng, *target), *others]
        return _Scene(specs, q, shape, [0, 1], layout="neighbor", direction=direction)

    def _count_shape(self, rng: np.random.Generator, k: int) -> _Scene:
        shape = _choice(rng, SHAPES)
        counted = [self._spec(rng, shape, _choice(rng, tuple(COLORS))) for _ in range(k)]
        others = self._others(rng, self._n(rng, k) - k, [s for s in SHAPES if s != shape])
        return _Scene([*counted, *others], f"How many {PLURAL[shape]} are there?", str(k), list(range(k)))

    def _count_all(self, rng: np.random.Generator, n: int) -> _Scene:
        specs = self._others(rng, n)
        return _Scene(specs, "How many objects are there?", str(n), list(range(n)))


def _left_of(a: Obj, b: Obj) -> bool:
    """``a`` clearly left of ``b``: disjoint in x, |dx| > |dy| (the benchmark's relation rule)."""
    (ax, ay), (bx, by) = a.center(), b.center()
    return a.x + a.size + GAP <= b.x and abs(by - ay) < bx - ax


def _fits_layout(layout: str, i: int, x: int, y: int, size: int, placed: list[Obj]) -> bool:
    """Placement rules in the frame where the asked relation is "left" (see :class:`_Scene`)."""
    if layout == "free" or i == 0:
        return True
    a, box = placed[0], Obj("", "", None, x, y, size)
    if i == 1 and layout == "pair":  # object 0 clearly left of object 1
        return _left_of(a, box)
    if i == 1 and layout == "neighbor":  # object 1 clearly left of object 0
        return _left_of(box, a)
    if layout == "neighbor":  # nothing else has its centre left of object 0's
        return box.center()[0] >= a.center()[0]
    return True


def _overlaps(x: int, y: int, size: int, placed: Sequence[Obj]) -> bool:
    return any(
        x < o.x + o.size + GAP and o.x < x + size + GAP and y < o.y + o.size + GAP and o.y < y + size + GAP
        for o in placed
    )


def _orient(o: Obj, direction: str, image_size: int) -> Obj:
    """Map a box from the "left" frame to ``direction`` (mirror and/or transpose)."""
    flip = image_size - o.x - o.size
    x, y = {"left": (o.x, o.y), "right": (flip, o.y), "above": (o.y, o.x), "below": (o.y, flip)}[direction]
    return dataclasses.replace(o, x=x, y=y)


def _place(rng: np.random.Generator, scene: _Scene, image_size: int, tries: int = 50) -> list[Obj] | None:
    """Random non-overlapping boxes obeying the layout, or None when an object finds no room."""
    placed: list[Obj] = []
    for i, spec in enumerate(scene.specs):
        for x, y in rng.integers(0, image_size - spec.size + 1, size=(tries, 2)).tolist():
            if _fits_layout(scene.layout, i, x, y, spec.size, placed) and not _overlaps(x, y, spec.size, placed):
                placed.append(Obj(spec.shape, spec.color, spec.glyph, x, y, spec.size))
                break
        else:
            return None
    return [_orient(o, scene.direction, image_size) for o in placed]


def unorient(o: Obj, direction: str, image_size: int) -> Obj:
    """The inverse of :func:`_orient`: a box in the frame where ``direction`` is "left"."""
    flip_x, flip_y = image_size - o.x - o.size, image_size - o.y - o.size
    x, y = {"left": (o.x, o.y), "right": (flip_x, o.y), "above": (o.y, o.x), "below": (flip_y, o.x)}[direction]
    return dataclasses.replace(o, x=x, y=y)


@dataclass(frozen=True)
class Question:
    """A question about a placed scene; ``evidence`` indexes the scene's objects."""

    family: str
    subtype: str
    question: str
    answer: str
    evidence: tuple[int, ...]


def nameable(objects: Sequence[Obj]) -> list[int]:
    """Indices of the objects a question can name as "the <colour> <shape>" (unique in the scene)."""
    pairs = [(o.color, o.shape) for o in objects]
    return [i for i, p in enumerate(pairs) if pairs.count(p) == 1]


def questions(objects: Sequence[Obj], image_size: int) -> list[Question]:
    """Every question the benchmark's rules allow about ``objects`` (the rules of the module
    docstring: each named object unique in the scene, relations along the dominant axis with
    the boxes disjoint along it, a neighbour the only object on its side of the referent).
    Whatever :func:`generate` asks about a scene is among them, with the same answer.
    Training draws extra questions about one image from here (``redundancy.micro.train``)."""
    out: list[Question] = []
    shapes = [o.shape for o in objects]
    pairs = [(o.color, o.shape) for o in objects]
    named = nameable(objects)
    out.append(Question("count", "count_all", "How many objects are there?", str(len(objects)),
                        tuple(range(len(objects)))))  # fmt: skip
    for shape in SHAPES:
        owners = tuple(i for i, s in enumerate(shapes) if s == shape)
        if len(owners) == 1:
            out.append(Question("color", "color", f"What color is the {shape}?", objects[owners[0]].color, owners))
        if owners:
            out.append(
                Question("count", "count_shape", f"How many {PLURAL[shape]} are there?", str(len(owners)), owners)
            )
    for i in named:
        o = objects[i]
        if o.glyph is not None:
            out.append(
                Question("reading", "reading", f"What is written on the {o.color} {o.shape}?", o.glyph.lower(), (i,))
            )
    where = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
    for direction in DIRECTIONS:
        frame = [unorient(o, direction, image_size) for o in objects]
        axis = "left or right of" if direction in ("left", "right") else "above or below"
        for i in named:
            for j in named:
                if i != j and _left_of(frame[i], frame[j]):
                    (c1, s1), (c2, s2) = pairs[i], pairs[j]
                    out.append(Question("spatial", "relation", f"Is the {c1} {s1} {axis} the {c2} {s2}?", direction,
                                        (min(i, j), max(i, j))))  # fmt: skip
        for ref in named:
            side = [k for k in range(len(objects)) if k != ref and frame[k].center()[0] < frame[ref].center()[0]]
            if len(side) == 1 and _left_of(frame[side[0]], frame[ref]):
                c, s = pairs[ref]
                out.append(Question("spatial", "neighbor", f"What shape is {where[direction]} the {c} {s}?",
                                    objects[side[0]].shape, tuple(sorted((ref, side[0])))))  # fmt: skip
    return out


def scene_bucket(objects: Sequence[Obj], image_size: int) -> int:
    """The scene's hash bucket in [0, 20): a function of what is drawn, not of object order."""
    key = json.dumps([image_size, sorted((o.x, o.y, o.size, o.shape, o.color, o.glyph or "") for o in objects)])
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") % 20


def generate(cfg: GenConfig, split: str) -> Iterator[Example]:
    """The endless, deterministic stream of ``split`` examples under ``cfg``."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is unknown; choose from {SPLITS}")
    rng = np.random.default_rng([cfg.seed, SPLITS.index(split)])
    sampler = _SceneSampler(cfg)
    while True:
        family, subtype, answer = sampler.plan(rng)
        for _ in range(20_000):  # a new scene for the same plan until one fits and hashes into the split
            scene = sampler.scene(rng, subtype, answer)
            for _ in range(10):  # retry the same objects first: dropping crowded scenes would skew counts
                if (objects := _place(rng, scene, cfg.image_size)) is not None:
                    break
            if objects is not None and scene_bucket(objects, cfg.image_size) in BUCKETS[split]:
                break
        else:
            raise RuntimeError(f"no {subtype} scene fits; loosen the config (object sizes or counts): {cfg}")
        # Reading order (top to bottom, left to right), so object order says nothing about the question.
        order = sorted(range(len(objects)), key=lambda k: (objects[k].y, objects[k].x))
        rank = {k: r for r, k in enumerate(order)}
        yield Example(
            image=render(objects, cfg.image_size),
            question=scene.question,
            answer=scene.answer,
            family=family,
            subtype=subtype,
            objects=tuple(objects[k] for k in order),
            evidence=tuple(sorted(rank[k] for k in scene.evidence)),
        )


# ---------------------------------------------------------------------------------------------
# Writing


def write_split(
    cfg: GenConfig, split: str, n: int, out: str | Path, *, overwrite: bool = False, progress: bool = True
) -> Path:
    """Write the first ``n`` examples of ``split`` to ``out`` in the local format; returns ``out``."""
    out = Path(out)
    if (out / QUESTIONS_FILE).exists():
        if not overwrite:
            raise FileExistsError(f"{out / QUESTIONS_FILE} exists; pass overwrite=true to replace it")
        shutil.rmtree(out / "images", ignore_errors=True)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with (out / QUESTIONS_FILE).open("w", encoding="utf-8") as f:
        stream = islice(generate(cfg, split), n)
        for i, ex in enumerate(tqdm(stream, total=n, desc=f"microvqa {split}", unit="q", disable=not progress)):
            image = f"images/{i:06d}.png"
            (out / image).write_bytes(png_bytes(ex.image))
            f.write(json.dumps(ex.record(f"{split}-{i:06d}", image), separators=(",", ":")) + "\n")
    meta = {"generator": "redundancy.micro.microvqa", "split": split, "n": n, "config": asdict(cfg)}
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return out


def config_from_meta(path: str | Path) -> tuple[GenConfig, str, int]:
    """The (config, split, n) recorded in a written directory's ``meta.json``."""
    meta = json.loads((Path(path) / "meta.json").read_text(encoding="utf-8"))
    return GenConfig(**meta["config"]), meta["split"], int(meta["n"])


# ---------------------------------------------------------------------------------------------
# Command line

# OmegaConf marks frozen dataclasses read-only, so Hydra could not apply overrides to GenConfig:
# the CLI schema is a mutable copy of its fields (same names, types and defaults).
_GenSchema = dataclasses.make_dataclass(
    "GenSchema",
    [
        (f.name, typing.get_type_hints(GenConfig)[f.name], field(default=f.default, default_factory=f.default_factory))
        for f in dataclasses.fields(GenConfig)
    ],
)


@dataclass
class MicroVQAConfig:
    split: str = "test"  # train | val | test
    n: int = 600  # questions (= images) to write
    out: str = "data/microvqa/${split}"
    overwrite: bool = False
    gen: _GenSchema = field(default_factory=_GenSchema)  # type: ignore[valid-type]  # GenConfig's fields


ConfigStore.instance().store(name="microvqa_schema", node=MicroVQAConfig)


def run(cfg: MicroVQAConfig) -> str:
    gen = GenConfig(**asdict(cfg.gen))
    path = write_split(gen, cfg.split, cfg.n, cfg.out, overwrite=cfg.overwrite)
    return f"wrote {cfg.n} {cfg.split} questions ({cfg.n} images) to {path}"


@hydra.main(version_base="1.3", config_path="../conf/microvqa", config_name="microvqa")
def main(cfg: DictConfig) -> None:
    run_entry(run, cfg, errors=(ValueError, FileExistsError))


if __name__ == "__main__":
    main()
