"""Generation with the KV cache under the engine against step-by-step recomputation
(docs/method.md section 5): greedy decoding on the stage caches (shorter after each
boundary) gives the same tokens and the same next-token logits as recomputing the
whole pruned forward pass at every step with the same kept sets, under both
position policies, for one sample and for a left-padded batch of two.
"""

from __future__ import annotations

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.schedule import DropSchedule
from tests.helpers import engine_generate
from tests.reference import make_sample, reference_greedy, reference_run, tiny_model  # noqa: F401

STEPS = 6
ATOL = 1e-8  # float64 SDPA


def left_pad(samples):
    """Left-pad ``(input_ids [1, L], pixel_values, image_sizes)`` samples into one batch."""
    width = max(s[0].shape[1] for s in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    pads = []
    for row, s in enumerate(samples):
        pad = width - s[0].shape[1]
        ids[row, pad:] = s[0][0]
        mask[row, pad:] = 1
        pads.append(pad)
    pv = torch.cat([s[1] for s in samples])
    sizes = None if samples[0][2] is None else torch.cat([s[2] for s in samples])
    return ids, mask, pv, sizes, pads


def generate(model, schedule, ids, mask, pv, sizes):
    """:func:`engine_generate` of ``STEPS`` tokens from one left-padded batch."""
    return engine_generate(
        model, schedule, STEPS, input_ids=ids, attention_mask=mask, pixel_values=pv, image_sizes=sizes
    )


def check_generation(model, schedule, samples):
    """Engine generation of ``samples`` (one batch, left-padded) against the reference,
    row by row; returns the per-layer cache lengths and the per-row stage lengths."""
    ids, mask, pv, sizes, pads = left_pad(samples)
    new, logits, trace, cache = generate(model, schedule, ids, mask, pv, sizes)
    stage_lengths = []  # per row, the prompt tokens each stage sees
    for row, (s_ids, s_pv, s_sizes) in enumerate(samples):
        # the engine's ranking of this row == the reference's ranking of the sample alone
        kept = [rec.kept[row].tolist() for rec in trace.boundaries]
        with torch.no_grad():
            ref = reference_run(model, s_ids, s_pv, schedule, image_sizes=s_sizes)
        assert kept == ref.kept, f"row {row}: kept image tokens differ"
        n_text = s_ids.shape[1] - ref.n_image
        stage_lengths.append([n_text + c for c in schedule.stage_counts(ref.n_image)])

        # greedy decoding by recomputing the pruned forward with those kept sets
        with torch.no_grad():
            tokens, ref_logits = reference_greedy(
                model, s_ids, s_pv, schedule, kept, STEPS, image_sizes=s_sizes, suppress=[model.config.image_token_id]
            )
        assert new[row].tolist() == tokens, f"row {row}: generated tokens differ"
        for step in range(STEPS):
            torch.testing.assert_close(
                logits[step, row], ref_logits[step], atol=ATOL, rtol=0,
                msg=lambda m, r=row, s=step: f"row {r} step {s}: {m}",
            )

    # Dropped tokens never enter later caches: a stage's layers cache exactly the
    # stage's tokens (rows re-padded to the longest) plus the STEPS - 1 generated
    # tokens fed back.
    starts = (0, *schedule.boundaries, len(cache.layers))
    for s in range(len(starts) - 1):
        expect = ids.shape[1] if s == 0 else max(lengths[s] for lengths in stage_lengths)
        for li in range(starts[s], starts[s + 1]):
            got = cache.layers[li].keys.shape[-2]
            assert got == expect + STEPS - 1, (
                f"layer {li} (stage {s}): cache holds {got} tokens, expected {expect} + {STEPS - 1}"
            )
    return [layer.keys.shape[-2] for layer in cache.layers], pads


SAMPLES = {
    # family, text backbone, per-row make_sample kwargs
    "single-llava": ("llava", "llama", [dict(seed=31, before=3, after=5)]),
    "single-next": ("llava_next", "qwen2", [dict(seed=32, image_hw=(56, 28), before=2, after=4)]),
    "batch-llava": ("llava", "mistral", [dict(seed=33, before=2, after=3), dict(seed=34, before=6, after=5)]),
    "batch-next": (
        "llava_next",
        "qwen2",
        [dict(seed=35, image_hw=(28, 56), before=4, after=3), dict(seed=36, image_hw=(56, 56), before=2, after=6)],
    ),
}


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("case", list(SAMPLES))
def test_pdrop_cached_generation_equals_recomputation(case, positions):
    family, text, rows = SAMPLES[case]
    model = tiny_model(family, text, "sdpa")
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, rank_layer="next", positions=positions)
    samples = [make_sample(model, **kw) for kw in rows]
    lengths, pads = check_generation(model, schedule, samples)
    if len(samples) > 1:
        assert len(set(pads)) > 1, "rows of different prompt lengths"
    assert lengths == sorted(lengths, reverse=True) and len(set(lengths)) == 4, lengths


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("batch", [1, 2])
def test_fastv_cached_generation_equals_recomputation(batch, positions):
    """FastV's ranking (layer K-1's own attention) on a GQA backbone."""
    model = tiny_model("llava", "qwen2", "sdpa")
    schedule = DropSchedule.fastv(K=2, R=0.5, positions=positions)
    samples = [make_sample(model, seed=41, before=5, after=2), make_sample(model, seed=42, before=2, after=4)][:batch]
    lengths, _ = check_generation(model, schedule, samples)
    assert lengths[0] == lengths[1] > lengths[2] == lengths[3]


def test_stage_last_compact_with_instruction_ranker():
    """A non-default combination: layer K-1 ranking by the instruction tokens, renumbered positions."""
    model = tiny_model("llava_next", "mistral", "sdpa")
    schedule = DropSchedule.pdrop(layers=(1, 3), ratios=(0.5, 0.2), ranker="instruction", rank_layer="stage_last")
    samples = [
        make_sample(model, seed=51, image_hw=(56, 28), before=2, after=5),
        make_sample(model, seed=52, before=3, after=3),
    ]
    check_generation(model, schedule, samples)


def record_positions(model):
    """Capture the position ids of every rotary call of the language model (the
    engine calls it once per stage in the prefill and once per decoding step for all
    stages); returns the list and the hook."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        pos = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        seen.append(pos.detach().clone())

    handle = model.model.language_model.rotary_emb.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, handle


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("batch", [1, 2])
def test_position_ids_follow_the_policy(batch, positions):
    """The position ids every stage uses, in prefill and in each decoding step, are the
    reference's: ``keep`` the original ones, ``compact`` 0..n-1 per stage with decoded
    tokens continuing each stage's own numbering (docs/method.md section 4). A decoding
    step computes the rotary embeddings once for all stages: one row block per position
    offset (``keep``: one for every stage; ``compact`` here: one per stage, as every
    boundary drops)."""
    model = tiny_model("llava_next", "llama", "sdpa")
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, positions=positions)
    samples = [
        make_sample(model, seed=101, image_hw=(56, 28), before=2, after=4),
        make_sample(model, seed=102, image_hw=(28, 56), before=5, after=3),
    ][:batch]
    ids, mask, pv, sizes, pads = left_pad(samples)
    seen, handle = record_positions(model)
    try:
        new, _, trace, _ = generate(model, schedule, ids, mask, pv, sizes)
    finally:
        handle.remove()
    stages = len(schedule.boundaries) + 1
    assert len(seen) == stages + STEPS - 1, "one rotary call per stage in the prefill, one per decoding step"
    groups = 1 if positions == "keep" else stages
    for row, (s_ids, s_pv, s_sizes) in enumerate(samples):
        kept = [rec.kept[row].tolist() for rec in trace.boundaries]
        for step in range(STEPS):
            tokens = s_ids[0].tolist() + new[row, :step].tolist()
            with torch.no_grad():
                ref = reference_run(model, tokens, s_pv, schedule, kept=kept, image_sizes=s_sizes)
            for s in range(stages):
                if step == 0:  # prefill: the row's real tokens are the last ones (left padding)
                    got = seen[s][min(row, seen[s].shape[0] - 1)]
                    n = len(ref.position_ids[s])
                    assert got[-n:].tolist() == ref.position_ids[s], f"row {row} stage {s} prefill"
                else:  # one new token per step; row block `group` of the step's call
                    call = seen[stages + step - 1]
                    per_group = call.reshape(groups, -1, call.shape[-1])
                    got = per_group[0 if groups == 1 else s][min(row, per_group.shape[1] - 1)]
                    assert got.tolist() == ref.position_ids[s][-1:], f"row {row} stage {s} step {step}"


def test_compact_positions_start_at_zero_when_the_prompt_starts_with_an_image():
    """``compact`` renumbers the kept tokens 0..n-1 even when the very first token of
    the prompt is an image token that gets dropped (no BOS)."""
    model = tiny_model("llava", "llama", "sdpa")
    ids, pv, _ = make_sample(model, seed=5, before=0, after=5)
    ids = ids[:, 1:]  # drop the BOS: the prompt starts with the image
    assert ids[0, 0] == model.config.image_token_id
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, positions="compact")
    with torch.no_grad():
        ref = reference_run(model, ids, pv, schedule)
    assert 0 not in ref.kept[-1]
    seen, handle = record_positions(model)
    try:
        with torch.no_grad(), apply_schedule(model, schedule):
            model(input_ids=ids, pixel_values=pv)
    finally:
        handle.remove()
    assert [p[0].tolist() for p in seen] == ref.position_ids
