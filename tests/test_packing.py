"""Packed training sequences (several questions per image) against separate sequences."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from redundancy.micro.microvqa import questions
from redundancy.micro.model import MicroConfig, build_micro
from redundancy.micro.packing import (
    EXTRA_EXCLUDED,
    SHAPE_MARGIN,
    SIDE,
    SIDE_MARGIN,
    collate_packed,
    extra_questions,
    packed_loss,
    shape_questions,
    side_questions,
)
from redundancy.micro.train import Stage, TrainConfig, check_config, draw, run, step_loss, suffix_length, vocabulary

SHAPE = MicroConfig(layers=3, hidden=32, heads=2, kv_heads=2, ffn=64, image_size=48, patch=8,
                    vision_layers=1, vision_hidden=32, vision_heads=2, vision_ffn=64)
STAGE = Stage(max_objects=4, min_size=12, max_size=20)
FAMILIES = {"color": 1.0, "reading": 1.0, "spatial": 1.0, "count": 1.0}


def _model(attn: str = "sdpa") -> tuple[torch.nn.Module, object]:
    model, processor = build_micro(SHAPE, vocabulary(SHAPE), seed=3)
    for layer in model.model.language_model.layers:  # the builder zeroes these: give every layer a function
        torch.nn.init.normal_(layer.self_attn.o_proj.weight, std=0.1)
        torch.nn.init.normal_(layer.mlp.down_proj.weight, std=0.1)
    model.config._attn_implementation = attn
    model.model.language_model.config._attn_implementation = attn
    return model.eval(), processor


def _batch(n: int = 4, k: int = 3, seed: int = 0) -> tuple[list, list]:
    examples = draw(STAGE, SHAPE, seed, 0, n)
    rng = np.random.default_rng(seed)
    return examples, [extra_questions(e, k - 1, FAMILIES, SHAPE.image_size, rng) for e in examples]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("prompt", ["llava", "mixed"])
def test_each_segment_computes_what_its_own_sequence_computes(attn: str, prompt: str) -> None:
    model, processor = _model(attn)
    examples, extras = _batch()
    packed = collate_packed(processor, examples, extras, prompt, n_image=SHAPE.n_image)
    assert len(packed["segments"]) > len(examples)  # some images got extra questions
    inputs = {k: v for k, v in packed.items() if k != "segments"}
    with torch.no_grad():
        logits = model(**inputs).logits
        for s in packed["segments"]:
            prefix = packed["input_ids"][s.row, : 3 + SHAPE.n_image]  # <s> user : <image> x n
            own = torch.cat([prefix, packed["input_ids"][s.row, s.start : s.start + s.length]])[None]
            alone = model(input_ids=own, pixel_values=packed["pixel_values"][s.row : s.row + 1]).logits[0]
            torch.testing.assert_close(logits[s.row, s.start : s.start + s.length], alone[len(prefix) :],
                                       atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prompt", ["llava", "bare", "mixed"])
@pytest.mark.parametrize("suffix", [False, True])
def test_one_question_per_image_gives_the_unpacked_loss(prompt: str, suffix: bool) -> None:
    model, processor = _model()
    examples = draw(STAGE, SHAPE, 1, 0, 5)
    with torch.no_grad():
        packed = packed_loss(model, collate_packed(processor, examples, [[] for _ in examples], prompt,
                                                   n_image=SHAPE.n_image), suffix_length(processor) if suffix else 0)
        unpacked = step_loss(model, None, processor, examples, SHAPE, torch.device("cpu"), prompt, suffix)
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)


def test_packed_loss_is_the_mean_over_every_question() -> None:
    """The packed loss equals the unpacked loss of the same questions as separate examples."""
    model, processor = _model()
    examples, extras = _batch(n=3, k=4, seed=2)
    flat = [e for e, more in zip(examples, extras)
            for e in [e, *(dataclasses.replace(e, question=q.question, answer=q.answer) for q in more)]]
    with torch.no_grad():
        packed = packed_loss(model, collate_packed(processor, examples, extras, n_image=SHAPE.n_image))
        unpacked = step_loss(model, None, processor, flat, SHAPE, torch.device("cpu"))
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)


def test_extra_questions_are_distinct_valid_and_follow_the_weights() -> None:
    examples = draw(Stage(), dataclasses.replace(SHAPE, image_size=96), 0, 0, 60)
    rng = np.random.default_rng(0)
    for e in examples:
        allowed = {(q.question, q.answer) for q in questions(e.objects, 96)}
        more = extra_questions(e, 5, FAMILIES, 96, rng)
        asked = [q.question for q in more]
        assert len(set(asked)) == len(asked) and e.question not in asked
        assert all((q.question, q.answer) in allowed and q.subtype not in EXTRA_EXCLUDED for q in more)
        only_colour = extra_questions(e, 5, {"color": 1.0, "count": 0.0}, 96, rng)
        assert all(q.family == "color" for q in only_colour)
        counts = extra_questions(e, 9, {"count": 1.0}, 96, rng, excluded=())
        expected = {(q.question, q.answer) for q in questions(e.objects, 96) if q.family == "count"} - {
            (e.question, e.answer)}
        assert {(q.question, q.answer) for q in counts} == expected  # every count, one shape's included
    again = [extra_questions(e, 3, FAMILIES, 96, np.random.default_rng(7)) for e in examples]
    assert again == [extra_questions(e, 3, FAMILIES, 96, np.random.default_rng(7)) for e in examples]


def test_side_questions_name_one_object_clearly_off_the_middle() -> None:
    examples = draw(Stage(), dataclasses.replace(SHAPE, image_size=96), 0, 0, 40)
    seen = set()
    for e in examples:
        pairs = [(o.color, o.shape) for o in e.objects]
        for q in side_questions(e.objects, 96):
            (i,) = q.evidence
            o = e.objects[i]
            assert pairs.count(pairs[i]) == 1 and q.question.endswith(f" is the {o.color} {o.shape}?")
            x, y = o.center()
            along = x if q.question.startswith("Left or right") else y
            assert abs(along - 48) >= SIDE_MARGIN
            assert q.answer == {True: {"left": "left", "above": "above"}, False: {"left": "right", "above": "below"}}[
                along < 48]["left" if q.question.startswith("Left") else "above"]
            seen.add(q.answer)
        more = extra_questions(e, 6, {"spatial": 1.0, SIDE: 1.0}, 96, np.random.default_rng(1))
        assert all(q.family in ("spatial", SIDE) for q in more)
        left_right = extra_questions(
            e, 6, {"spatial": 1.0, SIDE: 1.0}, 96, np.random.default_rng(1), "(?i)left or right"
        )
        candidates = [q for q in questions(e.objects, 96) + side_questions(e.objects, 96)
                      if q.family in ("spatial", SIDE) and "left or right" in q.question.lower()
                      and q.question != e.question]
        assert len(left_right) == min(6, len(candidates)) and set(left_right) <= set(candidates)
    assert seen == {"left", "right", "above", "below"}


def test_shape_questions_read_the_named_object_and_end_every_neighbour_question() -> None:
    examples = draw(
        Stage(families={"spatial": 1.0}, subtypes={"relation": 0.0, "neighbor": 1.0}),
        dataclasses.replace(SHAPE, image_size=96),
        0,
        0,
        60,
    )
    kinds, neighbours = set(), 0
    for e in examples:
        made = shape_questions(e.objects, 96)
        for q in made:
            (i,) = q.evidence
            o = e.objects[i]
            assert q.family == "shape" and q.answer == o.shape
            word = q.question.removeprefix("What shape is ").removesuffix("?")
            if q.subtype == "shape_color":
                assert word == o.color and [p.color for p in e.objects].count(o.color) == 1
            else:  # the first object from that side, its centre SHAPE_MARGIN px or more before the next one's
                along = {"left": lambda p: p.center()[0], "right": lambda p: -p.center()[0],
                         "above": lambda p: p.center()[1], "below": lambda p: -p.center()[1]}[word]
                rest = sorted(along(p) for j, p in enumerate(e.objects) if j != i)
                assert not rest or rest[0] - along(o) >= SHAPE_MARGIN
            kinds.add(q.subtype)
        edge = {
            q.question.removeprefix("What shape is ").removesuffix("?"): q.answer
            for q in made
            if q.subtype == "shape_edge"
        }
        for q in questions(e.objects, 96):
            if q.subtype == "neighbor":  # its answer is the first object from its side (the benchmark's rule)
                direction = q.question.split(" the ")[0].removeprefix("What shape is ").removesuffix(" of")
                assert edge[direction] == q.answer
                neighbours += 1
        more = extra_questions(e, 4, {"shape": 1.0}, 96, np.random.default_rng(2))
        assert len(more) == min(4, len(made)) and set(more) <= set(made)
    assert kinds == {"shape_color", "shape_edge"} and neighbours >= 60


def test_packed_stage_trains_and_is_checked(tmp_path: Path) -> None:
    easy = dict(max_objects=2, min_size=16, max_size=24, families={"color": 1.0, "count": 1.0, "reading": 0.0,
                                                                    "spatial": 0.0})
    stage = Stage(name="p", steps=40, layers=3, lr=3e-3, warmup=5, batch_size=8, questions=3, suffix_loss=True, **easy)
    cfg = TrainConfig(out=str(tmp_path), model=SHAPE, stages=[stage], eval_every=20, eval_size=32)
    run(cfg)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and sum(losses[-8:]) < 0.7 * sum(losses[:8])
    for bad in (dict(questions=0), dict(questions=2, drop=True), dict(questions=2, kind="vision")):
        with pytest.raises(ValueError, match="questions="):
            check_config(dataclasses.replace(cfg, stages=[dataclasses.replace(stage, **bad)]))
    for bad, message in ((dict(families={**easy["families"], SIDE: 1.0}), "extras"),
                         (dict(extras={"colour": 1.0}), "extras"),
                         (dict(questions=1, extras={SIDE: 1.0}), "questions > 1"),
                         (dict(extras_excluded=["count-shape"]), "extras_excluded"),
                         (dict(subtypes={"count_shape": 0.0, "count_all": 0.0}), "stage 'p'.*subtypes weigh 0"),
                         (dict(questions=1, extras_match="^Left"), "questions > 1")):
        with pytest.raises(ValueError, match=message):
            check_config(dataclasses.replace(cfg, stages=[dataclasses.replace(stage, **bad)]))
    check_config(
        dataclasses.replace(cfg, stages=[dataclasses.replace(stage, extras={SIDE: 1.0}, extras_match="^Left")])
    )
