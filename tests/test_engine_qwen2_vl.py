"""Qwen2-VL / Qwen2.5-VL under the engine: multimodal rotary positions (three
components), grouped-query attention, per-image token counts from ``image_grid_thw``.

* keep ratio 1 reproduces the unmodified HF model (logits, greedy generations);
* a left-padded batch of images of different sizes equals the samples one by one;
* cached greedy decoding under a drop schedule equals recomputing the pruned forward
  pass at every step (a plain reference below, with HF's own 3-D positions for
  ``keep`` and the bounding-box renumbering of docs/method.md section 4 for
  ``compact``), and every stage uses the positions the policy defines;
* kept counts follow ``floor(r * N)`` and only image tokens are dropped.

Inputs are built directly (no processor): ``[bos, text, <|vision_start|>, image
tokens, <|vision_end|>, text]`` with ``h * w / 4`` image tokens for an image of
``(1, h, w)`` patches, its flattened patches and ``mm_token_type_ids``.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.models.qwen2_vl import compact_mrope
from redundancy.ranking import grid_priority
from redundancy.schedule import DropSchedule
from tests.helpers import engine_generate
from tests.qwen_reference import (
    compact_reference,
    extend,
    left_pad,
    make_sample,
    qwen_model,
    reference_greedy,
    reference_run,
)

FAMILIES = ["qwen2_vl", "qwen2_5_vl"]


def test_reference_is_the_hf_model() -> None:
    """The reference with nothing dropped is the unmodified model (calibrates the tolerance)."""
    model = qwen_model()
    sample = make_sample(model, (4, 6), 3, 4, seed=1)
    with torch.no_grad():
        hf = model(**sample).logits[0]
        ref = reference_run(model, sample, DropSchedule.vanilla())
    torch.testing.assert_close(ref.logits, hf, atol=1e-10, rtol=0)


# ----------------------------------------------------------- equivalence
SCHEDULES = [
    pytest.param(DropSchedule.vanilla(), id="empty"),
    pytest.param(DropSchedule.drop(layer=2, ratio=1.0), id="drop-r1"),
    pytest.param(DropSchedule.fastv(K=1, R=0.0), id="fastv-R0"),
    pytest.param(DropSchedule.pdrop(layers=(1, 2, 3), lam=1.0), id="pdrop-lam1-next-compact"),
    pytest.param(
        DropSchedule.pdrop(layers=(1, 3), lam=1.0, rank_layer="stage_last", positions="keep"), id="pdrop-lam1-keep"
    ),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_keep_all_matches_unmodified_model(family: str, attn: str, batch_size: int, schedule: DropSchedule) -> None:
    model = qwen_model(family, attn, torch.float32)
    samples = [make_sample(model, (4, 6), 3, 5, seed=1), make_sample(model, (6, 8), 1, 3, seed=2)][:batch_size]
    batch = left_pad(samples)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        with apply_schedule(model, schedule) as trace:
            out = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    diff = (out - ref)[valid].abs().max().item()
    assert diff < 1e-5, f"max logit difference {diff}"
    assert torch.equal(gen, ref_gen)
    if not schedule.is_vanilla:
        assert trace.n_image == [6, 12][:batch_size]
        assert all(len(set(c)) == 1 for c in trace.kept_counts()), trace.kept_counts()


# ------------------------------------------------------------- batching
GRIDS = [(4, 6), (6, 8), (8, 8)]  # 6, 12 and 16 image tokens
BATCH_CASES = [
    pytest.param(DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5), id="pdrop-next-compact"),
    pytest.param(DropSchedule.fastv(K=2, R=0.5), id="fastv-stage_last-keep"),
    pytest.param(DropSchedule.pdrop(layers=(1, 3), lam=0.5, positions="keep", ranker="instruction"), id="instruction"),
    pytest.param(DropSchedule.fastv(K=2, R=0.75, ranker="inverse", positions="compact"), id="inverse-compact"),
    pytest.param(DropSchedule.drop(layer=2, ratio=0.3, ranker="random", seed=3), id="random"),
    pytest.param(DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="uniform"), id="uniform"),
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("schedule", BATCH_CASES)
def test_batched_equals_one_by_one(family: str, schedule: DropSchedule) -> None:
    model = qwen_model(family)
    samples = [make_sample(model, GRIDS[0], 3, 6, seed=11), make_sample(model, GRIDS[1], 1, 4, seed=12),
               make_sample(model, GRIDS[2], 2, 2, seed=13)]
    batch = left_pad(samples)
    width = batch["input_ids"].shape[1]
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        gen = model.generate(**batch, max_new_tokens=6, do_sample=False)
        kept = [[b.kept[i] for b in trace.boundaries] for i in range(3)]
        counts = trace.kept_counts()
        for row, single in enumerate(samples):
            gen1 = model.generate(**single, max_new_tokens=6, do_sample=False)
            assert torch.equal(gen1[0, single["input_ids"].shape[1] :], gen[row, width:]), row
            assert trace.kept_counts()[0] == counts[row]
            for b, record in enumerate(trace.boundaries):
                assert torch.equal(record.kept[0], kept[row][b]), (row, b)
    assert [c[0] for c in counts] == [6, 12, 16]


# ---------------------------------------------------------------- cache
STEPS = 5


CACHE_CASES = {
    "single": [((6, 8), 2, 4, 21)],
    "batch": [((4, 6), 4, 3, 22), ((8, 8), 1, 5, 23)],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_cached_generation_equals_recomputation(family: str, positions: str, case: str) -> None:
    model = qwen_model(family)
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, rank_layer="next", positions=positions)
    samples = [make_sample(model, grid, before, after, seed) for grid, before, after, seed in CACHE_CASES[case]]
    batch = left_pad(samples)
    new, logits, trace, cache = engine_generate(model, schedule, STEPS, **batch)
    stage_lengths = []
    for row, sample in enumerate(samples):
        with torch.no_grad():
            ref = reference_run(model, sample, schedule)
        kept = [rec.kept[row].tolist() for rec in trace.boundaries]
        assert kept == ref.kept, f"row {row}: kept image tokens differ"
        tokens, ref_logits = reference_greedy(model, sample, schedule, kept, STEPS)
        assert new[row].tolist() == tokens, f"row {row}: generated tokens differ"
        for step in range(STEPS):
            torch.testing.assert_close(logits[step, row], ref_logits[step], atol=1e-8, rtol=0)
        n_image = trace.n_image[row]
        stage_lengths.append([sample["input_ids"].shape[1] - n_image + c for c in schedule.stage_counts(n_image)])
    # Each stage caches its own tokens (rows re-padded to the longest) plus the fed-back ones.
    starts = (0, *schedule.boundaries, len(cache.layers))
    for s in range(len(starts) - 1):
        expect = batch["input_ids"].shape[1] if s == 0 else max(lengths[s] for lengths in stage_lengths)
        for li in range(starts[s], starts[s + 1]):
            assert cache.layers[li].keys.shape[-2] == expect + STEPS - 1, (li, s)


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_position_ids_follow_the_policy(positions: str) -> None:
    """Every stage's 3-D positions, in prefill and at each decoding step, are the
    reference's: ``keep`` HF's original ones, ``compact`` the bounding-box renumbering,
    decoded tokens continuing each stage's own numbering."""
    model = qwen_model()
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), ratios=(0.5, 0.25, 0.1), positions=positions)
    samples = [make_sample(model, (8, 8), 2, 4, seed=31), make_sample(model, (4, 6), 5, 3, seed=32)]
    batch = left_pad(samples)
    seen: list[torch.Tensor] = []

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        seen.append(args[1].detach().clone())  # position_ids [3, batch, n]

    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        new, _, trace, _ = engine_generate(model, schedule, STEPS, **batch)
    finally:
        handle.remove()
    stages = len(schedule.boundaries) + 1
    # One rotary call per stage in the prefill; one per decoding step for every stage, a row
    # block per position offset (keep: one block; compact here: one per stage, as each boundary drops).
    assert len(seen) == stages + STEPS - 1
    groups = 1 if positions == "keep" else stages
    differs = False
    for row, sample in enumerate(samples):
        kept = [rec.kept[row].tolist() for rec in trace.boundaries]
        for step in range(STEPS):
            with torch.no_grad():
                ref = reference_run(model, extend(sample, new[row, :step].tolist()), schedule, kept=kept)
            for s in range(stages):
                want = torch.tensor(ref.positions[s])
                if step == 0:  # prefill: the row's real tokens are the last ones (left padding)
                    got = seen[s][:, row]
                    assert torch.equal(got[:, -want.shape[1] :], want), f"row {row} stage {s} prefill"
                else:
                    call = seen[stages + step - 1]
                    got = call.reshape(call.shape[0], groups, -1, call.shape[-1])[:, 0 if groups == 1 else s, row]
                    assert torch.equal(got[:, -1], want[:, -1]), f"row {row} stage {s} step {step}"
                differs |= ref.positions[s] != ref.original[s]
    if positions == "compact":
        assert differs, "the drops should shrink some image's bounding box"


# ----------------------------------------------------------- the policy
def test_compact_is_the_identity_when_nothing_is_dropped() -> None:
    """HF's own positions of a left-padded batch with two images per row come back unchanged."""
    model = qwen_model()
    cfg = model.config
    rows = []
    for seed, grids in ((41, [(4, 6), (6, 4)]), (42, [(8, 8), (2, 4)])):
        a, b = (make_sample(model, g, 2, 1, seed + i) for i, g in enumerate(grids))
        ids = torch.cat([a["input_ids"], b["input_ids"][:, 1:]], dim=1)  # two images, one bos
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "mm_token_type_ids": (ids == cfg.image_token_id).int(),
                     "image_grid_thw": torch.cat([a["image_grid_thw"], b["image_grid_thw"]]),
                     "pixel_values": torch.cat([a["pixel_values"], b["pixel_values"]])})
    batch = left_pad(rows)
    valid = batch["attention_mask"].bool()
    pos, _ = model.model.get_rope_index(
        batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"]
    )
    first = valid.long().argmax(1, keepdim=True)
    start = pos.gather(2, first[None].expand(3, -1, -1)).amin(0)
    is_image = batch["input_ids"] == cfg.image_token_id
    assert torch.equal(compact_mrope(pos, valid, is_image, start), torch.where(valid[None], pos, 0))


def test_compact_crops_each_image_to_its_kept_bounding_box() -> None:
    """Closed form: text (0..3), a 2x3 image at 4 (cells (0, i, j) -> (4, 4 + i, 4 + j)),
    text from 7. Keeping cells (1, 1) and (1, 2) leaves a 1x2 box: (4, 4, 4), (4, 4, 5);
    the text resumes at 4 + max(1, 2) = 6."""
    t = [0, 1, 2, 3, 4, 4, 7, 8]
    h = [0, 1, 2, 3, 5, 5, 7, 8]
    w = [0, 1, 2, 3, 5, 6, 7, 8]
    kept = torch.tensor([t, h, w])[:, None, :]
    is_image = torch.tensor([[False] * 4 + [True] * 2 + [False] * 2])
    valid = torch.ones_like(is_image)
    got = compact_mrope(kept, valid, is_image, torch.tensor([[0]]))[:, 0].tolist()
    assert got == [[0, 1, 2, 3, 4, 4, 6, 7], [0, 1, 2, 3, 4, 4, 6, 7], [0, 1, 2, 3, 4, 5, 6, 7]]
    ids = [5, 5, 5, 5, 9, 9, 9, 9, 9, 9, 5, 5]  # the same through the reference's definition
    original = torch.tensor([[0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8], [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8],
                             [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]])
    assert compact_reference(ids, [0, 1, 2, 3, 8, 9, 10, 11], original, 9) == got


# ---------------------------------------------------------- counts, control
@pytest.mark.parametrize(
    "schedule",
    [
        DropSchedule.drop(layer=2, ratio=0.0),
        DropSchedule.fastv(K=2, R=0.5),
        DropSchedule.pdrop(layers=(1, 2, 3), ratios=(0.7, 0.3, 0.1)),
        DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="uniform", positions="keep"),
        DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="random"),
    ],
    ids=lambda s: f"{s.method}-{s.ratios}-{s.ranker}",
)
def test_counts_and_only_image_tokens_dropped(schedule: DropSchedule) -> None:
    model = qwen_model("qwen2_vl", "sdpa", torch.float32)
    batch = left_pad([make_sample(model, (6, 8), 3, 6, seed=51), make_sample(model, (4, 6), 1, 4, seed=52)])
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    labels[:, :-3] = -100  # the last 3 tokens are the answer
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        logits = model(**batch, labels=labels).logits
    is_img = batch["input_ids"] == model.config.image_token_id
    assert trace.n_image == [12, 6]
    for row, n in enumerate(trace.n_image):
        expected = [n] + [math.floor(r * n + 1e-9) for r in schedule.ratios]
        assert list(trace.kept_counts()[row]) == expected
        for s, record in enumerate(trace.boundaries):
            assert len(record.kept[row]) == expected[s + 1]
        keep_img = torch.zeros(n, dtype=torch.bool)
        keep_img[trace.boundaries[-1].kept[row]] = True
        dropped = torch.zeros_like(is_img[row])
        dropped[torch.nonzero(is_img[row]).flatten()[~keep_img]] = True
        valid = batch["attention_mask"][row].bool()
        assert torch.equal((logits[row] == 0).all(-1)[valid], dropped[valid])


def test_uniform_control_uses_the_merged_grid() -> None:
    """An (8, 8)-patch image is a 4 x 4 grid of merged tokens: keeping 4 of 16 under
    ``uniform`` keeps the spatially even cells of that grid."""
    model = qwen_model()
    sample = make_sample(model, (8, 8), 2, 3, seed=61)
    with torch.no_grad(), apply_schedule(model, DropSchedule.drop(layer=2, ratio=0.25, ranker="uniform")) as trace:
        model(**sample)
    expected = sorted(torch.argsort(grid_priority(4, 4), stable=True)[:4].tolist())
    assert trace.boundaries[0].kept[0].tolist() == expected
