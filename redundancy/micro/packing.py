"""Several questions about one image in one training sequence, none seeing another.

    batch = collate_packed(processor, examples, extras, prompt="llava", n_image=144)
    loss = packed_loss(model, batch)

A training-only speed-up (``Stage.questions`` in :mod:`redundancy.micro.train`). The image
costs ~145 of the ~163 tokens of a micro-LLaVA example, so asking ``k`` questions
about it in separate sequences repeats the image ``k`` times. A packed row holds the
shared prefix (``<s> USER: <image>x144``) once, then each question's tokens (question,
prompt suffix, answer, ``</s>``) as a segment. A 4D attention mask lets each segment
see the prefix and itself only, and each segment's position ids restart where the
prefix ends. Every segment therefore computes exactly what its own unpacked sequence
computes (``tests/test_packing.py`` checks the logits against the unmodified model on
separate sequences), at about 1.3x the cost of one sequence for four questions.

The first question of each image is the generator's (answers balanced per subtype);
the others are drawn from :func:`redundancy.micro.microvqa.questions` (every question the
benchmark's rules allow about that scene), by the stage's family weights. Counting one
shape is left out of the extras by default: on generated scenes its answers are mostly 1 or 2
(the test set draws 1..6 evenly), and the model would learn that prior (``excluded``, a
stage's ``extras_excluded``, lets it in).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from redundancy.micro.microvqa import DIRECTIONS, Example, Obj, Question, nameable, questions, unorient
from redundancy.micro.model import format_prompt

EXTRA_EXCLUDED = ("count_shape",)  # skewed answers on generated scenes (module docstring)
SIDE = "side"  # the training-only family of :func:`side_questions` (a weight in ``families``)
SIDE_MARGIN = 12  # px between a side question's object centre and the image's middle
SHAPE = "shape"  # the training-only family of :func:`shape_questions`
TRAINING_ONLY_SUBTYPES = (SIDE, "shape_color", "shape_edge")  # the subtypes of those families
SHAPE_MARGIN = 8  # px between the first object's centre from a side and the next one's


def side_questions(objects: tuple[Obj, ...], image_size: int, margin: int = SIDE_MARGIN) -> list[Question]:
    """Training-only questions on one named object's side of the image ("Left or right is the red
    circle?" -> ``left``), for objects whose centre lies ``margin`` px or more off the middle:
    the lookup a spatial relation compares, asked on its own (experiments/log/micro_llava_training.md)."""
    out = []
    for i in nameable(objects):
        o = objects[i]
        for axis, (low, high), centre in (("Left or right", ("left", "right"), o.center()[0]),
                                          ("Above or below", ("above", "below"), o.center()[1])):  # fmt: skip
            if abs(centre - image_size / 2) >= margin:
                answer = low if centre < image_size / 2 else high
                out.append(Question(SIDE, SIDE, f"{axis} is the {o.color} {o.shape}?", answer, (i,)))
    return out


def shape_questions(objects: tuple[Obj, ...], image_size: int, margin: int = SHAPE_MARGIN) -> list[Question]:
    """Training-only questions answered by a shape, the readout the neighbour question ends on:
    of the only object of a colour ("What shape is red?" -> ``circle``, subtype ``shape_color``)
    and of the first object from a side of the image, whose centre lies ``margin`` px or more
    before every other's ("What shape is left?", subtype ``shape_edge``). By the benchmark's rule
    the neighbour question's answer is that first object from its side."""
    out = []
    colors = [o.color for o in objects]
    for i, o in enumerate(objects):
        if colors.count(o.color) == 1:
            out.append(Question(SHAPE, "shape_color", f"What shape is {o.color}?", o.shape, (i,)))
    for direction in DIRECTIONS:
        order = sorted((unorient(o, direction, image_size).center()[0], i) for i, o in enumerate(objects))
        if len(order) == 1 or order[1][0] - order[0][0] >= margin:
            first = order[0][1]
            out.append(Question(SHAPE, "shape_edge", f"What shape is {direction}?", objects[first].shape, (first,)))
    return out


TRAINING_ONLY = {SIDE: side_questions, SHAPE: shape_questions}  # family -> its question maker


def extra_questions(
    example: Example,
    n: int,
    families: dict[str, float],
    image_size: int,
    rng: np.random.Generator,
    match: str = "",
    excluded: Collection[str] = EXTRA_EXCLUDED,
) -> list[Question]:
    """Up to ``n`` distinct questions about ``example``'s scene other than its own (matching
    the regular expression ``match``, of no subtype in ``excluded``): each draws a family by
    ``families`` weight (the training-only ones of ``TRAINING_ONLY`` among them), then a
    subtype, then a question, uniformly."""
    pool: dict[str, dict[str, list[Question]]] = {}
    made = [q for family, make in TRAINING_ONLY.items() if families.get(family, 0) > 0
            for q in make(example.objects, image_size)]  # fmt: skip
    for q in questions(example.objects, image_size) + made:
        if (q.question != example.question and q.subtype not in excluded and families.get(q.family, 0) > 0
                and re.search(match, q.question)):
            pool.setdefault(q.family, {}).setdefault(q.subtype, []).append(q)
    out: list[Question] = []
    while len(out) < n and pool:
        names = sorted(pool)
        weights = np.array([families[f] for f in names], dtype=float)
        family = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        subtypes = pool[family]
        subtype = sorted(subtypes)[int(rng.integers(len(subtypes)))]
        out.append(subtypes[subtype].pop(int(rng.integers(len(subtypes[subtype])))))
        if not subtypes[subtype]:
            del subtypes[subtype]
        if not subtypes:
            del pool[family]
    return out


@dataclass
class Segment:
    """One question's tokens in a packed row: ``start`` is its first token's index."""

    row: int
    start: int
    length: int
    llava: bool  # LLaVA prompt (the suffix loss applies) or bare


def _ids(processor: Any, text: str, n_image: int) -> list[int]:
    expanded = text.replace(processor.image_token, processor.image_token * n_image)
    return processor.tokenizer(expanded).input_ids


def collate_packed(
    processor: Any,
    examples: list[Example],
    extras: list[list[Question]],
    prompt: str = "llava",
    *,
    n_image: int,
) -> dict[str, Any]:
    """Packed rows (right-padded): ``input_ids``, ``pixel_values``, ``position_ids``, an additive
    4D ``attention_mask`` [rows, 1, len, len], and the ``segments``. ``prompt`` is ``llava``,
    ``bare`` or ``mixed`` (segments alternate bare, LLaVA, ... over the whole batch); ``n_image``
    is the model's image tokens per image (``MicroConfig.n_image``)."""
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    rows: list[list[int]] = []
    positions: list[list[int]] = []
    owners: list[list[int]] = []  # 0: the shared prefix, j: segment j, -1: padding
    segments: list[Segment] = []
    index = 0
    for r, (example, more) in enumerate(zip(examples, extras)):
        row: list[int] = []
        pairs = [(example.question, example.answer)] + [(q.question, q.answer) for q in more]
        for j, (question, answer) in enumerate(pairs):
            kind = prompt if prompt != "mixed" else ("bare" if index % 2 == 0 else "llava")
            index += 1
            ids = _ids(processor, f"{format_prompt(question, kind)} {answer} </s>", n_image)
            cut = max(i for i, t in enumerate(ids) if t == image_id) + 1  # the prefix ends after the image
            if j == 0:
                row, pos, own = ids[:cut], list(range(cut)), [0] * cut
            elif ids[:cut] != row[:cut]:
                raise ValueError("packed questions must share the prompt up to the image")
            segments.append(Segment(r, len(row), len(ids) - cut, kind == "llava"))
            row += ids[cut:]
            pos += list(range(cut, len(ids)))
            own += [j + 1] * (len(ids) - cut)
        rows.append(row)
        positions.append(pos)
        owners.append(own)
    width = max(map(len, rows))
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    position_ids = torch.tensor([p + [0] * (width - len(p)) for p in positions])
    owner = torch.tensor([o + [-1] * (width - len(o)) for o in owners])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = (owner[:, :, None] == owner[:, None, :]) | (owner[:, None, :] == 0)  # [rows, query, key]
    allowed = causal & same & (owner[:, None, :] >= 0)
    allowed |= torch.eye(width, dtype=torch.bool)  # padding attends to itself (no empty softmax row)
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
    pixels = processor.image_processor([e.image for e in examples], return_tensors="pt")["pixel_values"]
    return {"input_ids": input_ids, "pixel_values": pixels, "position_ids": position_ids,
            "attention_mask": mask[:, None], "segments": segments}  # fmt: skip


def packed_loss(model: Any, batch: dict[str, Any], suffix_positions: int = 0) -> torch.Tensor:
    """The unpacked trainer's loss, per segment: the mean cross-entropy of the answer word and
    ``</s>`` over all segments, plus (``suffix_positions`` = n > 0) the answer's mean
    cross-entropy at the n LLaVA-prompt positions before the answering one."""
    segments: list[Segment] = batch["segments"]
    inputs = {k: v.to(model.device) for k, v in batch.items() if k != "segments"}
    inputs["attention_mask"] = inputs["attention_mask"].to(model.dtype)
    logp = model(**inputs).logits.float().log_softmax(-1)
    ids = inputs["input_ids"]
    rows = torch.tensor([s.row for s in segments], device=ids.device)
    end = torch.tensor([s.start + s.length for s in segments], device=ids.device)  # one past </s>
    answer = ids[rows, end - 2]
    # the answering position (end - 3) predicts the answer, the answer's position predicts </s>
    main = torch.cat(
        [logp[rows, end - 3].gather(-1, answer[:, None]), logp[rows, end - 2].gather(-1, ids[rows, end - 1][:, None])]
    )
    loss = -main.mean()
    llava = torch.tensor([s.llava for s in segments], device=ids.device)
    if suffix_positions and bool(llava.any()):
        offsets = torch.arange(-3 - suffix_positions, -3, device=ids.device)
        at = (end[llava, None] + offsets)  # [segments, n]
        extra = logp[rows[llava, None], at].gather(-1, answer[llava, None, None].expand(-1, suffix_positions, 1))
        loss = loss - extra.mean()
    return loss
