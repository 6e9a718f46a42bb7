"""The engine against the slow reference (tests/reference.py): kept image tokens,
ranking scores and logits, for FastV, PyramidDrop and the single-layer drop, both
families, Llama and GQA Mistral/Qwen2 backbones, SDPA and eager kernels.

Float64 models so that near-ties cannot flip a ranking and the logits agree to
rounding noise. HF's eager kernel runs its softmax in float32 even for a float64
model, so eager comparisons use 1e-6 (calibrated by ``test_reference_is_the_hf_model``).
"""

from __future__ import annotations

import pytest
import torch

from redundancy.schedule import DropSchedule
from tests.checks import ATOL, check_row, compare, run_engine
from tests.reference import make_sample, reference_forward, reference_run, tiny_model  # noqa: F401

FASTV = DropSchedule.fastv(K=2, R=0.5)
PDROP = dict(layers=(1, 2, 3), lam=0.5)

CASES = [
    # FastV: K=2, R=0.5 (layer 1's attention of the last token, positions kept)
    *[("fastv", fam, text, "sdpa", FASTV) for fam in ("llava", "llava_next") for text in ("llama", "mistral", "qwen2")],
    # PyramidDrop: both rank layers x both position policies
    *[
        (f"pdrop-{rl}-{pos}", fam, text, "sdpa", DropSchedule.pdrop(**PDROP, rank_layer=rl, positions=pos))
        for rl in ("stage_last", "next")
        for pos in ("keep", "compact")
        for fam, text in (("llava", "mistral"), ("llava_next", "llama"))
    ],
    ("pdrop-default", "llava", "qwen2", "sdpa", DropSchedule.pdrop(**PDROP)),
    ("pdrop-ratios", "llava", "qwen2", "sdpa", DropSchedule.pdrop((1, 2, 3), ratios=(0.75, 0.4, 0.1))),
    ("pdrop-ratios", "llava_next", "mistral", "sdpa", DropSchedule.pdrop((1, 3), ratios=(0.6, 0.3), positions="keep")),
    ("pdrop-to-zero", "llava", "llama", "sdpa", DropSchedule.pdrop((1, 2, 3), ratios=(0.5, 0.0, 0.0))),
    # rankers
    *[
        (f"{ranker}-{name}", fam, text, "sdpa", sched)
        for ranker in ("instruction", "inverse")
        for name, sched in (
            ("fastv", DropSchedule.fastv(K=2, R=0.5, ranker=ranker)),
            ("pdrop", DropSchedule.pdrop(**PDROP, ranker=ranker)),
        )
        for fam, text in (("llava", "llama"), ("llava_next", "qwen2"))
    ],
    # single-layer drop at the first and the last possible boundary
    ("drop-1", "llava", "mistral", "sdpa", DropSchedule.drop(layer=1, ratio=0.3)),
    ("drop-3", "llava_next", "qwen2", "sdpa", DropSchedule.drop(layer=3, ratio=0.1, positions="compact")),
    # eager kernels
    ("eager-fastv", "llava", "llama", "eager", FASTV),
    ("eager-pdrop", "llava_next", "mistral", "eager", DropSchedule.pdrop(**PDROP)),
    ("eager-pdrop-sl", "llava", "qwen2", "eager",
     DropSchedule.pdrop(**PDROP, rank_layer="stage_last", positions="keep")),
    ("eager-instruction", "llava_next", "qwen2", "eager", DropSchedule.pdrop(**PDROP, ranker="instruction")),
]


@pytest.mark.parametrize(
    "name,family,text,impl,schedule", CASES, ids=[f"{c[0]}-{c[1]}-{c[2]}-{c[3]}" for c in CASES]
)
def test_engine_matches_reference(name, family, text, impl, schedule):
    ref = compare(family, text, impl, schedule, seed=len(name), after=5)
    # the tuple form: full-length logits with NaN rows where the engine holds zeros
    model = tiny_model(family, text, impl)
    ids, pv, sizes = make_sample(model, seed=len(name), after=5)
    with torch.no_grad():
        full, kept, scores = reference_forward(model, ids, pv, schedule, image_sizes=sizes)
    logits, _ = run_engine(model, ids, pv, sizes, schedule)
    dropped = torch.isnan(full).all(-1)
    assert kept == ref.kept and len(scores) == len(schedule.boundaries)
    assert int(dropped.sum()) == ref.length - len(ref.positions)
    assert bool((logits[0][dropped] == 0).all())
    torch.testing.assert_close(logits[0][~dropped], full[~dropped], atol=ATOL[impl], rtol=0)


@pytest.mark.parametrize("kv_heads", [4, 1], ids=["mha", "mqa"])
@pytest.mark.parametrize("family,text", [("llava", "llama"), ("llava_next", "mistral")])
@pytest.mark.parametrize("schedule", [FASTV, DropSchedule.pdrop(**PDROP)], ids=["fastv", "pdrop"])
def test_head_layouts(schedule, family, text, kv_heads):
    """Plain multi-head (4 key heads) and multi-query (1 key head) attention; the
    other tests use grouped-query attention (4 query heads over 2 key heads)."""
    compare(family, text, "sdpa", schedule, kv_heads=kv_heads, seed=13 + kv_heads)


@pytest.mark.parametrize(
    "schedule",
    [FASTV, DropSchedule.pdrop(**PDROP), DropSchedule.pdrop(**PDROP, ranker="instruction")],
    ids=["fastv", "pdrop", "pdrop-instr"],
)
def test_two_images_in_one_prompt(schedule):
    """Image-token indices run over both images of a sample (32 tokens)."""
    ref = compare("llava", "qwen2", "sdpa", schedule, n_images=2, seed=11)
    assert ref.n_image == 32


@pytest.mark.parametrize("family,text", [("llava", "llama"), ("llava_next", "qwen2")])
def test_float32_sdpa(family, text):
    """The default dtype: same kept tokens, logits to float32 noise."""
    compare(family, text, "sdpa", DropSchedule.pdrop(**PDROP), dtype=torch.float32, atol=2e-4, seed=5)
    compare(family, text, "sdpa", FASTV, dtype=torch.float32, atol=2e-4, seed=6)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("family,text", [("llava", "mistral"), ("llava_next", "llama")])
def test_reference_is_the_hf_model(family, text, impl):
    """Calibration: the reference with no schedule is the HF model; so is the engine at ratio 1."""
    model = tiny_model(family, text, impl)
    ids, pv, sizes = make_sample(model, seed=3)
    with torch.no_grad():
        hf = model(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits[0]
        ref = reference_run(model, ids, pv, DropSchedule.vanilla(), image_sizes=sizes)
    assert ref.positions == list(range(ids.shape[1]))
    torch.testing.assert_close(ref.logits, hf, atol=ATOL[impl], rtol=0)
    full, trace = run_engine(model, ids, pv, sizes, DropSchedule.pdrop((1, 2), ratios=(1.0, 1.0)))
    torch.testing.assert_close(full[0], hf, atol=1e-12 if impl == "sdpa" else 1e-6, rtol=0)
    assert trace.boundaries[0].kept[0].tolist() == list(range(ref.n_image))


def test_left_padded_batch_prefill():
    """A batch of two NeXT samples with different image-token counts and prompt lengths,
    left-padded, row by row against single-sample references."""
    model = tiny_model("llava_next", "qwen2", "sdpa")
    a = make_sample(model, image_hw=(56, 28), before=2, after=6, seed=21)
    b = make_sample(model, image_hw=(28, 56), before=5, after=3, seed=22)
    lengths = [a[0].shape[1], b[0].shape[1]]
    width = max(lengths)
    pads = [width - n for n in lengths]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (sample, pad) in enumerate(zip((a, b), pads)):
        ids[row, pad:] = sample[0][0]
        mask[row, pad:] = 1
    assert pads[0] != pads[1]
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)  # what generate() passes
    pv = torch.cat([a[1], b[1]])
    sizes = torch.cat([a[2], b[2]])
    stage_last = DropSchedule.pdrop(**PDROP, rank_layer="stage_last", positions="keep")
    for schedule in (FASTV, DropSchedule.pdrop(**PDROP), stage_last):
        logits, trace = run_engine(model, ids, pv, sizes, schedule, attention_mask=mask, position_ids=position_ids)
        counts = []
        for row, (sample, pad) in enumerate(zip((a, b), pads)):
            with torch.no_grad():
                ref = reference_run(model, sample[0], sample[1], schedule, image_sizes=sample[2])
            check_row(logits, trace, row, ref, schedule, ATOL["sdpa"], pad=pad)
            counts.append(ref.n_image)
        assert counts[0] != counts[1]


def test_comparisons_have_power():
    """The knobs the tests above vary change the reference's answer, so a wrong
    policy in the engine cannot pass by accident."""
    model = tiny_model("llava", "llama", "sdpa")
    ids, pv, sizes = make_sample(model, seed=7)
    run = lambda s: reference_run(model, ids, pv, s, image_sizes=sizes)  # noqa: E731
    with torch.no_grad():
        keep = run(DropSchedule.pdrop(**PDROP, positions="keep"))
        compact = run(DropSchedule.pdrop(**PDROP, positions="compact"))
        stage_last = run(DropSchedule.pdrop(**PDROP, rank_layer="stage_last", positions="compact"))
        inverse = run(DropSchedule.pdrop(**PDROP, ranker="inverse"))
        instruction = run(DropSchedule.pdrop(**PDROP, ranker="instruction"))
    assert keep.kept[0] == compact.kept[0]  # positions do not change the first ranking ...
    assert keep.kept != compact.kept  # ... but they change the later ones
    assert (keep.logits - compact.logits).abs().max() > 1e-4  # ... and the result
    assert stage_last.kept != compact.kept
    assert instruction.kept != compact.kept
    assert not set(inverse.kept[0]) & set(compact.kept[0])


@pytest.mark.parametrize(
    "schedule",
    [DropSchedule.fastv(K=2, R=0.5), DropSchedule.pdrop((2, 3), ratios=(0.5, 0.25), rank_layer="next")],
    ids=["stage_last", "next"],
)
def test_exact_ties_go_to_the_earlier_token(schedule):
    """With the ranking layer's keys zeroed every visible key gets the same attention,
    so every score ties exactly and the earliest image tokens are kept, in a single
    sample and in a left-padded batch (ties must not depend on the padding)."""
    from redundancy.models.factory import build_model, tiny_config

    model = build_model(tiny_config("llava", text="qwen2"), dtype=torch.float64, seed=2)
    layer = schedule.boundaries[0] - (1 if schedule.rank_layer == "stage_last" else 0)
    with torch.no_grad():
        k_proj = model.model.language_model.layers[layer].self_attn.k_proj
        k_proj.weight.zero_()
        if k_proj.bias is not None:
            k_proj.bias.zero_()
    a = make_sample(model, seed=91, before=2, after=3)
    b = make_sample(model, seed=92, before=6, after=4)
    refs = []
    for ids, pv, sizes in (a, b):
        with torch.no_grad():
            ref = reference_run(model, ids, pv, schedule)
        assert ref.kept[0] == list(range(kept := len(ref.kept[0]))) and kept == 8
        assert torch.unique(ref.scores[0]).numel() == 1
        logits, trace = run_engine(model, ids, pv, sizes, schedule)
        check_row(logits, trace, 0, ref, schedule, ATOL["sdpa"])
        refs.append(ref)
    width = max(a[0].shape[1], b[0].shape[1])
    pads = [width - a[0].shape[1], width - b[0].shape[1]]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (s, pad) in enumerate(zip((a, b), pads)):
        ids[row, pad:], mask[row, pad:] = s[0][0], 1
    logits, trace = run_engine(
        model, ids, torch.cat([a[1], b[1]]), None, schedule,
        attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
    )
    for row, ref in enumerate(refs):
        check_row(logits, trace, row, ref, schedule, ATOL["sdpa"], pad=pads[row])
