"""The microvqa generator: determinism, disjoint splits, answerable and balanced questions,
the committed test set, and the command line."""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections import Counter
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from PIL import Image

from redundancy.data import (
    EVIDENCE_POSITIONS,
    evidence_position,
    evidence_positions,
    load_dataset,
    normalize_answer,
    patch_indices,
)
from redundancy.micro import microvqa as mv

ROOT = Path(__file__).resolve().parents[1]
TEST_SET = ROOT / "redundancy" / "assets" / "microvqa" / "test"
CFG = mv.GenConfig()
# Tiny scene space (one 36-px object in a 40-px image: 40 shape/colour pairs x 25 positions,
# plus glyphs): seeds alone would make splits collide; only the hash partition keeps them apart.
TINY = mv.GenConfig(image_size=40, patch=4, max_objects=1, min_size=36, max_size=36, families={"color": 1.0})


def take(cfg: mv.GenConfig, split: str, n: int) -> list[mv.Example]:
    return list(islice(mv.generate(cfg, split), n))


@pytest.fixture(scope="module")
def train_examples() -> list[mv.Example]:
    return take(CFG, "train", 300)


@pytest.fixture(scope="module")
def committed() -> list:
    return load_dataset(TEST_SET)


def pixel_hash(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def load_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------------------------------------
# An independent checker: parse the question text, answer it from the objects metadata alone.

COLOR_Q = re.compile(r"What color is the (\w+)\?")
READING_Q = re.compile(r"What is written on the (\w+) (\w+)\?")
RELATION_Q = re.compile(r"Is the (\w+) (\w+) (left or right of|above or below) the (\w+) (\w+)\?")
NEIGHBOR_Q = re.compile(r"What shape is (left of|right of|above|below) the (\w+) (\w+)\?")
COUNT_Q = re.compile(r"How many (\w+) are there\?")


def _center(o: dict) -> tuple[float, float]:
    x, y, s = o["box"]
    return x + s / 2, y + s / 2


def _only(objects: list[dict], **attrs: str) -> int:
    hits = [i for i, o in enumerate(objects) if all(o[k] == v for k, v in attrs.items())]
    assert len(hits) == 1, f"referent {attrs} is not unique: {hits}"
    return hits[0]


def _relation(a: dict, b: dict, axis: str) -> str:
    """Where a lies from b along ``axis`` (x or y); asserts the relation is clear."""
    (ax, ay), (bx, by) = _center(a), _center(b)
    (a0, a1), (b0, b1) = [((o["box"][k], o["box"][k] + o["box"][2])) for o in (a, b) for k in [0 if axis == "x" else 1]]
    along, across = (ax - bx, ay - by) if axis == "x" else (ay - by, ax - bx)
    assert abs(along) > abs(across), "relation is not along the dominant axis"
    assert a1 <= b0 or b1 <= a0, "boxes overlap along the asked axis"
    if axis == "x":
        return "left" if along < 0 else "right"
    return "above" if along < 0 else "below"


def answer_from_metadata(question: str, objects: list[dict]) -> tuple[str, set[int]]:
    """(answer, evidence) derived from the question text and objects, asserting uniqueness."""
    if m := COLOR_Q.fullmatch(question):
        i = _only(objects, shape=m[1])
        return objects[i]["color"], {i}
    if m := READING_Q.fullmatch(question):
        i = _only(objects, color=m[1], shape=m[2])
        assert objects[i]["glyph"] is not None
        return objects[i]["glyph"].lower(), {i}
    if m := RELATION_Q.fullmatch(question):
        a, b = _only(objects, color=m[1], shape=m[2]), _only(objects, color=m[4], shape=m[5])
        return _relation(objects[a], objects[b], "x" if m[3].startswith("left") else "y"), {a, b}
    if m := NEIGHBOR_Q.fullmatch(question):
        direction = m[1].split()[0]
        r = _only(objects, color=m[2], shape=m[3])
        rx, ry = _center(objects[r])
        side = {"left": lambda x, y: x < rx, "right": lambda x, y: x > rx,
                "above": lambda x, y: y < ry, "below": lambda x, y: y > ry}[direction]  # fmt: skip
        hits = [i for i, o in enumerate(objects) if i != r and side(*_center(o))]
        assert len(hits) == 1, f"{len(hits)} objects lie {direction} the referent"
        assert _relation(objects[hits[0]], objects[r], "x" if direction in ("left", "right") else "y") == direction
        return objects[hits[0]]["shape"], {r, hits[0]}
    if m := COUNT_Q.fullmatch(question):
        if m[1] == "objects":
            return str(len(objects)), set(range(len(objects)))
        shape = {v: k for k, v in mv.PLURAL.items()}[m[1]]
        counted = {i for i, o in enumerate(objects) if o["shape"] == shape}
        return str(len(counted)), counted
    raise AssertionError(f"unknown question template: {question!r}")


def check_scene(objects: list[dict], image_size: int, cfg: mv.GenConfig) -> None:
    """Boxes inside the image, apart by the gap, sizes in range, glyphs that fit their shape."""
    boxes = [o["box"] for o in objects]
    assert cfg.min_objects <= len(objects) <= cfg.max_objects
    for i, (x, y, s) in enumerate(boxes):
        assert 0 <= x and 0 <= y and x + s <= image_size and y + s <= image_size
        assert cfg.min_size <= s <= cfg.max_size
        assert objects[i]["glyph"] is None or mv.glyph_fits(objects[i]["shape"], s)
        for x2, y2, s2 in boxes[i + 1 :]:
            apart = x + s + mv.GAP <= x2 or x2 + s2 + mv.GAP <= x or y + s + mv.GAP <= y2 or y2 + s2 + mv.GAP <= y
            assert apart, "objects overlap"
    assert [(b[1], b[0]) for b in boxes] == sorted((b[1], b[0]) for b in boxes), "objects not in reading order"


def test_checker_catches_a_wrong_answer() -> None:
    objects = [{"shape": "circle", "color": "red", "glyph": None, "box": [0, 0, 20]},
               {"shape": "circle", "color": "blue", "glyph": "K", "box": [40, 0, 20]}]  # fmt: skip
    with pytest.raises(AssertionError, match="not unique"):
        answer_from_metadata("What color is the circle?", objects)
    assert answer_from_metadata("What is written on the blue circle?", objects) == ("k", {1})
    assert answer_from_metadata("Is the red circle left or right of the blue circle?", objects)[0] == "left"
    assert answer_from_metadata("What shape is right of the red circle?", objects)[0] == "circle"


# ---------------------------------------------------------------------------------------------
# Generator


def test_deterministic_per_seed() -> None:
    a, b = take(CFG, "train", 25), take(CFG, "train", 25)
    assert [mv.png_bytes(x.image) for x in a] == [mv.png_bytes(x.image) for x in b]
    assert [x.record("q", "i") for x in a] == [x.record("q", "i") for x in b]
    c = take(replace(CFG, seed=1), "train", 25)
    assert sum(pixel_hash(x.image) == pixel_hash(y.image) for x, y in zip(a, c)) == 0
    assert [x.question for x in a] != [x.question for x in c]


def test_splits_never_share_images() -> None:
    hashes = {split: {pixel_hash(x.image) for x in take(TINY, split, n)} for split, n in
              [("train", 300), ("val", 60), ("test", 60)]}  # fmt: skip
    assert len(hashes["train"]) > 150  # the scene space is small but not degenerate
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]


def test_every_scene_hashes_into_its_split() -> None:
    for split in mv.SPLITS:
        for ex in take(CFG, split, 20):
            assert mv.scene_bucket(ex.objects, CFG.image_size) in mv.BUCKETS[split]
    with pytest.raises(ValueError, match="split"):
        next(mv.generate(CFG, "dev"))


def test_committed_test_images_not_in_train_or_val(committed: list) -> None:
    test = {pixel_hash(load_pixels(s.image_path)) for s in committed}
    other = {pixel_hash(x.image) for split in ("train", "val") for x in take(CFG, split, 150)}
    assert len(test) == len(committed)
    assert not test & other


def test_questions_answerable_from_metadata(train_examples: list[mv.Example]) -> None:
    for ex in train_examples:
        objects = [o.to_json() for o in ex.objects]
        check_scene(objects, CFG.image_size, CFG)
        answer, evidence = answer_from_metadata(ex.question, objects)
        assert answer == ex.answer, ex.question
        assert evidence == set(ex.evidence), ex.question


def test_every_question_about_a_scene_is_valid(train_examples: list[mv.Example]) -> None:
    """``questions`` (the extra training questions) obeys the rules the independent checker
    asserts, and includes what the generator asked, with the same answer and evidence."""
    subtypes: Counter = Counter()
    for ex in train_examples[:120]:
        objects = [o.to_json() for o in ex.objects]
        asked = mv.questions(ex.objects, CFG.image_size)
        assert len({q.question for q in asked}) == len(asked)
        for q in asked:
            answer, evidence = answer_from_metadata(q.question, objects)
            assert (q.answer, set(q.evidence)) == (answer, evidence), q.question
            assert q.subtype in mv.SUBTYPES[q.family]
            subtypes[q.subtype] += 1
        own = [q for q in asked if q.question == ex.question]
        assert [(q.answer, q.evidence, q.subtype) for q in own] == [(ex.answer, ex.evidence, ex.subtype)]
    assert set(subtypes) == {s for group in mv.SUBTYPES.values() for s in group}


def test_answers_in_vocabulary_and_normalised(train_examples: list[mv.Example]) -> None:
    vocab = mv.answer_vocabulary(CFG)
    for ex in train_examples:
        assert ex.answer in vocab[ex.family]
        assert normalize_answer(ex.answer) == ex.answer
        assert ex.subtype in mv.SUBTYPES[ex.family]
    assert {ex.family for ex in train_examples} == set(mv.FAMILIES)


def test_answers_balanced_within_each_subtype(train_examples: list[mv.Example]) -> None:
    """Each subtype draws answers from a shuffled bag: counts differ by at most one, and
    the named attribute varies (the answer is not a function of the question)."""
    by_subtype: dict[str, Counter] = {}
    for ex in train_examples:
        by_subtype.setdefault(ex.subtype, Counter())[ex.answer] += 1
    vocab = {"color": mv.COLORS, "reading": mv.GLYPHS, "relation": mv.DIRECTIONS, "neighbor": mv.SHAPES,
             "count_shape": range(1, 7), "count_all": range(1, 7)}  # fmt: skip
    for subtype, counts in by_subtype.items():
        assert len(counts) == len(vocab[subtype]), subtype
        assert max(counts.values()) - min(counts.values()) <= 1, (subtype, counts)
    asked = Counter((COLOR_Q.fullmatch(ex.question)[1], ex.answer) for ex in train_examples if ex.family == "color")
    assert len({shape for shape, _ in asked}) == len(mv.SHAPES)
    assert all(len({a for s, a in asked if s == shape}) >= 3 for shape in mv.SHAPES)


def test_family_weights_and_curriculum() -> None:
    stage1 = mv.GenConfig(max_objects=1, min_size=28, families={"color": 1.0})
    examples = take(stage1, "train", 40)
    assert {ex.family for ex in examples} == {"color"}
    assert all(len(ex.objects) == 1 and ex.objects[0].size >= 28 for ex in examples)
    weighted = replace(CFG, families={"reading": 3.0, "count": 1.0})
    reading_heavy = Counter(ex.family for ex in take(weighted, "train", 200))
    assert set(reading_heavy) == {"reading", "count"}
    assert reading_heavy["reading"] > 2 * reading_heavy["count"]
    neighbours = replace(CFG, families={"spatial": 1.0, "count": 1.0}, subtypes={"relation": 0.0, "count_all": 3.0})
    subtypes = Counter(ex.subtype for ex in take(neighbours, "train", 200))
    assert set(subtypes) == {"neighbor", "count_all", "count_shape"}
    assert subtypes["count_all"] > 2 * subtypes["count_shape"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 90}, "multiple of patch"),
        ({"families": {"colour": 1.0}}, "unknown families"),
        ({"families": {"color": 0.0}}, "positive sum"),
        ({"max_objects": 1}, "spatial family needs"),
        ({"max_size": 14, "min_size": 12}, "glyph"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"glyph_prob": 1.5}, "glyph_prob"),
        ({"subtypes": {"neighbour": 1.0}}, "subtype weights"),
        ({"subtypes": {"relation": -1.0}}, "subtype weights"),
        ({"subtypes": {"relation": 0.0, "neighbor": 0.0}}, "all its subtypes weigh 0"),
    ],
)
def test_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mv.GenConfig(**kwargs)


def test_palette_and_glyphs() -> None:
    colors = list(mv.COLORS.values()) + [mv.BACKGROUND]
    for i, a in enumerate(colors):
        for b in colors[i + 1 :]:
            assert np.abs(np.subtract(a, b)).sum() >= 90, (a, b)  # clearly distinct
    for name, rgb in mv.COLORS.items():
        assert mv.contrast(mv.INK[name], rgb) >= 4.5, name  # WCAG AA for the glyph on its object
    bitmaps = {g: mv.glyph_bitmap(g) for g in mv.GLYPHS}
    assert all(b.shape == (mv.GLYPH_H, mv.GLYPH_W) for b in bitmaps.values())
    assert len({b.tobytes() for b in bitmaps.values()}) == len(mv.GLYPHS)  # no two glyphs alike
    for g in mv.GLYPHS:  # the normaliser keeps every glyph answer (e.g. "a" would vanish)
        assert normalize_answer(g.lower()) == g.lower()


def test_render_draws_shape_and_glyph() -> None:
    circle = mv.Obj("circle", "red", None, 10, 20, 30)
    img = mv.render([circle], 96)
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    assert tuple(img[35, 25]) == mv.COLORS["red"]  # centre
    assert tuple(img[20, 10]) == mv.BACKGROUND  # box corner lies outside a circle
    assert tuple(img[5, 5]) == mv.BACKGROUND
    marked = mv.render([replace(circle, glyph="T")], 96)
    ink = np.all(marked == mv.INK["red"], axis=-1)
    assert ink.sum() == mv.glyph_bitmap("T").sum()  # every glyph pixel drawn, nothing else in ink
    assert ink[20:50, 10:40][mv.shape_mask("circle", 30)].sum() == ink.sum()  # all of it on the circle


def test_edge_targets_mark_the_answer_of_every_neighbour_question(train_examples: list[mv.Example]) -> None:
    """``edge_<side>`` flags the first object from that side: the object a neighbour question
    ("What shape is left of X?") answers with, and no other."""
    rows = {name: i for i, name in enumerate(mv.PATCH_TARGETS)}
    asked = [(ex, NEIGHBOR_Q.fullmatch(ex.question)) for ex in train_examples if ex.subtype == "neighbor"]
    assert len(asked) >= 10
    for ex, m in asked:
        labels = mv.patch_targets(ex.objects, CFG.image_size, CFG.patch)
        flagged = labels[rows[f"edge_{m[1].split()[0]}"]] == 1
        assert flagged.any() and not (flagged & (labels[0] == 0)).any()  # object patches only
        assert set(labels[rows["shape"]][flagged]) == {1 + mv.SHAPES.index(ex.answer)}
        assert all(labels[rows[f"edge_{side}"]].sum() > 0 for side in mv.DIRECTIONS)


def test_patch_indices() -> None:
    assert patch_indices([0, 0, 4], 96, 4) == [0]
    assert patch_indices([4, 4, 8], 96, 4) == [25, 26, 49, 50]
    assert patch_indices([5, 0, 4], 96, 4) == [1, 2]  # straddles two patches
    assert len(patch_indices([0, 0, 96], 96, 4)) == 576


# ---------------------------------------------------------------------------------------------
# On disk: write_split, the committed test set, the command line


def test_write_split_round_trip(tmp_path: Path) -> None:
    out = mv.write_split(CFG, "val", 6, tmp_path / "val", progress=False)
    samples = load_dataset(out)
    examples = take(CFG, "val", 6)
    assert [s.question_id for s in samples] == [f"val-{i:06d}" for i in range(6)]
    for s, ex in zip(samples, examples):
        assert s.question == ex.question and s.answers == (ex.answer,) and s.family == ex.family
        assert np.array_equal(load_pixels(s.image_path), ex.image)
        assert s.meta["objects"] == [o.to_json() for o in ex.objects]
    assert mv.config_from_meta(out) == (CFG, "val", 6)
    with pytest.raises(FileExistsError):
        mv.write_split(CFG, "val", 2, out, progress=False)
    mv.write_split(CFG, "val", 2, out, overwrite=True, progress=False)
    assert len(load_dataset(out)) == 2 and len(list((out / "images").iterdir())) == 2


def test_committed_test_set(committed: list) -> None:
    cfg, split, n = mv.config_from_meta(TEST_SET)
    assert split == "test" and n == len(committed) >= 500
    assert Counter(s.family for s in committed).keys() == set(mv.FAMILIES)
    assert min(Counter(s.family for s in committed).values()) >= 100
    assert len({s.question_id for s in committed}) == n
    size = sum(p.stat().st_size for p in TEST_SET.rglob("*") if p.is_file())
    assert size < 2 * 2**20, f"{size} bytes"
    vocab = mv.answer_vocabulary(cfg)
    for s in committed:
        assert len(s.answers) == 1 and s.answers[0] in vocab[s.family]
        check_scene(s.meta["objects"], cfg.image_size, cfg)
        answer, evidence = answer_from_metadata(s.question, s.meta["objects"])
        assert answer == s.answers[0] and evidence == set(s.meta["evidence"]), s.question_id


def test_committed_test_set_regenerates(committed: list) -> None:
    """The first questions of the recorded (config, split) stream equal the committed ones,
    pixel for pixel (PNG bytes may differ across zlib builds; pixels may not)."""
    cfg, split, _ = mv.config_from_meta(TEST_SET)
    records = [json.loads(line) for line in (TEST_SET / "questions.jsonl").read_text().splitlines()]
    for i, ex in enumerate(take(cfg, split, 40)):
        assert ex.record(records[i]["question_id"], records[i]["image"]) == records[i]
        assert np.array_equal(load_pixels(committed[i].image_path), ex.image)


def _compose(overrides: list[str]) -> mv.MicroVQAConfig:
    with initialize_config_dir(config_dir=str(ROOT / "redundancy" / "conf" / "microvqa"), version_base=None):
        typed = OmegaConf.to_object(compose(config_name="microvqa", overrides=overrides))
    assert isinstance(typed, mv.MicroVQAConfig)
    return typed


def test_command_writes_a_split(tmp_path: Path) -> None:
    cfg = _compose(["split=val", "n=3", f"out={tmp_path / 'x'}", "gen.max_objects=2", "gen.families.count=0"])
    assert mv.run(cfg).startswith("wrote 3 val questions")
    samples = load_dataset(tmp_path / "x")
    assert len(samples) == 3 and all(len(s.meta["objects"]) <= 2 for s in samples)
    gen, _, _ = mv.config_from_meta(tmp_path / "x")
    assert gen == replace(CFG, max_objects=2, families={**CFG.families, "count": 0.0})
    assert _compose([]).out == "data/microvqa/test"
    with pytest.raises(ConfigCompositionException):
        _compose(["gen.max_object=2"])


def test_png_is_rgb_at_image_size(committed: list) -> None:
    with Image.open(committed[0].image_path) as im:
        assert im.mode == "RGB" and im.size == (96, 96)
    buf = io.BytesIO(mv.png_bytes(np.zeros((8, 8, 3), np.uint8)))
    assert Image.open(buf).format == "PNG"


# ---------------------------------------------------------------- where the evidence lies
def question(*boxes: list[int], evidence: list[int] | None = None) -> dict:
    objects = [{"shape": "circle", "color": "red", "glyph": None, "box": list(b)} for b in boxes]
    return {"objects": objects, "evidence": list(range(len(boxes))) if evidence is None else evidence}


@pytest.mark.parametrize(
    ("record", "position"),
    [
        (question([10, 0, 20]), "top"),
        (question([10, 28, 20]), "top"),  # rows 28..47: the last top row of a 96 px image
        (question([10, 29, 20]), "both"),  # rows 29..48: crosses the middle
        (question([10, 48, 20]), "bottom"),
        (question([0, 60, 36]), "bottom"),
        (question([0, 0, 12], [50, 0, 12]), "top"),  # two objects, both on top
        (question([0, 0, 12], [50, 70, 12]), "both"),  # one each side
        (question([0, 0, 12], [50, 70, 12], evidence=[1]), "bottom"),  # only the evidence counts
        (question([0, 0, 12], evidence=[]), "both"),  # no object named: the whole image
    ],
)
def test_evidence_position_rule(record: dict, position: str) -> None:
    assert evidence_position(record, 96) == position


def test_evidence_positions_of_the_committed_test_set() -> None:
    positions = evidence_positions(TEST_SET)
    records = [json.loads(line) for line in (TEST_SET / "questions.jsonl").read_text().splitlines()]
    assert list(positions) == [r["question_id"] for r in records]
    counts = Counter(positions.values())
    assert set(counts) == set(EVIDENCE_POSITIONS) and min(counts.values()) >= 100
    for r in records:  # every top question's evidence patches lie in the top rows of the 12 x 12 token grid
        if positions[r["question_id"]] == "top":
            assert all(i // 12 < 6 for j in r["evidence"] for i in patch_indices(r["objects"][j]["box"], 96, 8))
