"""The ranking scores beyond ``last`` / ``instruction`` (docs/method.md section 3): ``mean``,
``norope``, ``nosink`` / ``nosink_keep``, against the slow reference (tests/reference.py) on tiny
LLaVA, LLaVA-NeXT and Qwen2-VL models under SDPA: kept image tokens, scores and logits.
Plus the power checks (each score changes what is kept), schedule records and FLOPs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.flops import ranking_flops
from redundancy.presets import get_preset
from redundancy.priors import Prior, calibrate, ranking_layers
from redundancy.ranking import SINK_NORM_RATIO, grid_cells, grid_priority, pool_windows
from redundancy.schedule import RANKERS, DropSchedule, kept_count
from tests.checks import ATOL, check_row, compare, run_engine, with_answers
from tests.qwen_reference import compact_reference, hf_language_inputs, qwen_model
from tests.qwen_reference import make_sample as qwen_sample
from tests.qwen_reference import reference_run as qwen_reference
from tests.reference import (
    SINK_RATIO,
    attention_row,
    layer_forward,
    make_sample,
    merged_inputs_embeds,
    qkv,
    reference_run,
    tiny_model,
)

NEW = ("mean", "norope", "nosink", "nosink_keep")  # attention rankers; vision_cls is tested on its own
PDROP = dict(layers=(1, 2, 3), lam=0.5)
SCHEDULES = {
    "fastv": lambda r: DropSchedule.fastv(K=2, R=0.5, ranker=r),  # stage_last, positions kept
    "pdrop": lambda r: DropSchedule.pdrop(**PDROP, ranker=r),  # next, compact
}
FAMILIES = [("llava", "llama"), ("llava_next", "qwen2")]


@contextlib.contextmanager
def sink_at(model, token: int, scale: float = 1000.0, every_image: bool = False) -> Iterator[None]:
    """Image token ``token`` of the first image's features (``every_image``: of every image and
    crop, so that a batch and its samples one by one agree) enters the LM ``scale`` times larger:
    a massive activation that the residual stream carries through every layer."""
    def hook(module, args, out):
        out = out.clone()
        if every_image:
            out[:, token] *= scale
        else:
            out.view(-1, out.shape[-1])[token] *= scale
        return out

    handle = model.model.multi_modal_projector.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def test_rankers_are_selectable_and_recorded() -> None:
    assert {*NEW, "vision_cls", "pool", "debias"} <= set(RANKERS)
    for ranker in (*NEW, "vision_cls", "pool", "debias"):
        assert DropSchedule.drop(layer=2, ratio=0.5, ranker=ranker).record()["ranker"] == ranker
    assert SINK_RATIO == SINK_NORM_RATIO  # the reference's threshold is the documented one


@pytest.mark.parametrize("ranker", ["pool", "debias"])
def test_every_entry_point_takes_the_name(ranker: str) -> None:
    """The sweep's method config, the lmms-eval model arguments and the FLOPs / bench config
    build a schedule with the ranker; a misspelt name lists it among the choices."""
    from redundancy.bench import BenchConfig, schedules_for
    from redundancy.flops import FlopsConfig
    from redundancy.lmms.model import schedule_from_args
    from redundancy.schedule import DropSpec, FastVSpec
    from redundancy.sweep import SweepConfig, schedules_from_config

    sweep = SweepConfig(method=DropSpec(ranker=[ranker, "last"], layer=2, ratio=0.5), reference=False)
    assert [p.ranker for p in schedules_from_config(sweep, 4)] == [ranker, "last"]
    assert schedule_from_args("pdrop", layers="[1,2]", lam=0.5, ranker=ranker).ranker == ranker
    assert DropSchedule.from_spec(FlopsConfig(method=FastVSpec(ranker=ranker)).method).ranker == ranker
    assert schedules_for(BenchConfig(methods=["fastv"], ranker=ranker))["fastv"].ranker == ranker
    with pytest.raises(ValueError, match=ranker):
        DropSchedule.drop(layer=2, ratio=0.5, ranker=ranker[:-1])


@pytest.mark.parametrize("family,text", FAMILIES)
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("ranker", NEW)
def test_ranker_matches_reference(ranker: str, name: str, family: str, text: str) -> None:
    compare(family, text, "sdpa", SCHEDULES[name](ranker), seed=40 + len(name), after=5)


@pytest.mark.parametrize("ranker", ["mean", "norope", "nosink", "vision_cls"])
def test_eager_kernel(ranker: str) -> None:
    """The scores do not depend on the kernel: eager attention, with a sink for ``nosink``."""
    model = tiny_model("llava", "qwen2", "eager")
    with sink_at(model, 5):
        compare("llava", "qwen2", "eager", SCHEDULES["fastv"](ranker), seed=43, after=5)


def test_mean_in_row_chunks(monkeypatch) -> None:
    """``mean`` scores its many query rows a few at a time (bounded memory); the same result."""
    import redundancy.ranking as ranking

    monkeypatch.setattr(ranking, "_ROW_CHUNK", 4)
    compare("llava_next", "qwen2", "sdpa", SCHEDULES["pdrop"]("mean"), seed=44, after=5)


def test_scores_change_what_is_kept() -> None:
    """``mean`` and ``norope`` keep other tokens than ``last`` on the reference, so an engine
    that ignored the ranker would fail the comparisons above."""
    model = tiny_model("llava", "llama", "sdpa")
    ids, pv, sizes = make_sample(model, seed=45, after=5)
    with torch.no_grad():
        kept = {r: reference_run(model, ids, pv, SCHEDULES["pdrop"](r), image_sizes=sizes).kept
                for r in ("last", "mean", "norope", "nosink")}
    assert kept["mean"] != kept["last"]
    assert kept["norope"] != kept["last"]
    assert kept["nosink"] == kept["last"]  # no sink in a random tiny model: the same ranking


@pytest.mark.parametrize("family,text", FAMILIES)
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_sinks_are_left_out_and_dropped_or_kept(name: str, family: str, text: str) -> None:
    """A massive activation on image token 3: ``nosink`` drops it, ``nosink_keep`` keeps it,
    and the others' scores come from a softmax without it, as the reference computes."""
    model = tiny_model(family, text, "sdpa")
    ids, pv, sizes = make_sample(model, seed=46, after=5)
    with sink_at(model, 3), torch.no_grad():
        refs = {}
        for ranker in ("last", "nosink", "nosink_keep"):
            schedule = SCHEDULES[name](ranker)
            refs[ranker] = ref = reference_run(model, ids, pv, schedule, image_sizes=sizes)
            logits, trace = run_engine(model, ids, pv, sizes, schedule)
            check_row(logits, trace, 0, ref, schedule, ATOL["sdpa"])
    assert all(3 not in kept for kept in refs["nosink"].kept)
    assert all(3 in kept for kept in refs["nosink_keep"].kept)
    first = refs["nosink"].scores[0]
    assert first[3] == -1.0 and refs["nosink_keep"].scores[0][3] == 2.0
    others = [j for j in range(len(first)) if j != 3]
    assert torch.allclose(first[others], refs["nosink_keep"].scores[0][others])
    assert float(first[others].sum()) > float(refs["last"].scores[0][others].sum())  # renormalised without it


@pytest.mark.parametrize("ranker", NEW)
def test_training_query_rows(ranker: str) -> None:
    """With labels (two answer spans) the query rows are the tokens before each answer; ``mean``
    adds every token from the first image token on except the answers."""
    model = tiny_model("llava", "qwen2", "sdpa")
    prompt, pv, sizes = make_sample(model, seed=48, before=3, after=4)
    ids, labels, _ = with_answers(model, prompt, [(0, 3), (3, 4)], seed=49)
    schedule = SCHEDULES["pdrop"](ranker)
    with torch.no_grad(), sink_at(model, 6):
        ref = reference_run(model, ids, pv, schedule, labels=labels, image_sizes=sizes)
        logits, trace = run_engine(model, ids, pv, sizes, schedule, labels=labels)
    check_row(logits, trace, 0, ref, schedule, ATOL["sdpa"])


@pytest.mark.parametrize("ranker", ["mean", "norope", "nosink"])
def test_left_padded_batch(ranker: str) -> None:
    """Two NeXT samples of different image-token and query-row counts (and sinks), left-padded,
    row by row against single-sample references."""
    model = tiny_model("llava_next", "qwen2", "sdpa")
    samples = [make_sample(model, image_hw=(56, 28), before=2, after=6, seed=51),
               make_sample(model, image_hw=(28, 56), before=5, after=3, seed=52)]
    width = max(s[0].shape[1] for s in samples)
    pads = [width - s[0].shape[1] for s in samples]
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, (sample, pad) in enumerate(zip(samples, pads)):
        ids[row, pad:], mask[row, pad:] = sample[0][0], 1
    schedule = SCHEDULES["pdrop"](ranker)
    pv, sizes = torch.cat([s[1] for s in samples]), torch.cat([s[2] for s in samples])
    with sink_at(model, 2, every_image=True):
        logits, trace = run_engine(model, ids, pv, sizes, schedule, attention_mask=mask,
                                   position_ids=(mask.cumsum(1) - 1).clamp(min=0))
        for row, (sample, pad) in enumerate(zip(samples, pads)):
            with torch.no_grad():
                ref = reference_run(model, sample[0], sample[1], schedule, image_sizes=sample[2])
            check_row(logits, trace, row, ref, schedule, ATOL["sdpa"], pad=pad)
            assert (ranker == "nosink") == bool((ref.scores[0] == -1).any())  # sinks found and dropped
    assert trace.n_image[0] != trace.n_image[1]


# ---------------------------------------------------------------- vision_cls
@pytest.mark.parametrize("text", ["llama", "qwen2"])
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("n_images", [1, 2])
def test_vision_cls_matches_reference(n_images: int, name: str, text: str) -> None:
    """The vision tower's [CLS] attention (its feature layer, computed by hand in the reference)
    ranks at every boundary; one and two images per prompt."""
    ref = compare("llava", text, "sdpa", SCHEDULES[name]("vision_cls"), seed=50 + n_images, n_images=n_images)
    model = tiny_model("llava", text, "sdpa")
    ids, pv, sizes = make_sample(model, seed=50 + n_images, n_images=n_images)
    with torch.no_grad():
        last = reference_run(model, ids, pv, SCHEDULES[name]("last"), image_sizes=sizes)
    assert ref.kept != last.kept


def test_vision_cls_with_images_encoded_once() -> None:
    """The grid runner encodes a batch's images once (the trunk) and hands every schedule the
    same features without running the tower again: the score still comes with them."""
    from redundancy.grid import encode_images_once

    model = tiny_model("llava", "llama", "sdpa")
    ids, pv, sizes = make_sample(model, seed=53)
    schedule = SCHEDULES["pdrop"]("vision_cls")
    alone, trace = run_engine(model, ids, pv, sizes, schedule)
    kept = [rec.kept[0].tolist() for rec in trace.boundaries]
    with encode_images_once(model):
        with torch.no_grad():
            model(input_ids=ids, pixel_values=pv, image_sizes=sizes)  # the trunk encodes the images
        shared, trace = run_engine(model, ids, pv, sizes, schedule)
    assert [rec.kept[0].tolist() for rec in trace.boundaries] == kept
    assert torch.equal(shared, alone)


@pytest.mark.parametrize("family", ["llava_next", "qwen2_vl"])
def test_vision_cls_needs_a_cls_token(family: str) -> None:
    model = qwen_model() if family == "qwen2_vl" else tiny_model(family, "llama", "sdpa")
    with pytest.raises(ValueError, match="vision_cls"), apply_schedule(model, SCHEDULES["fastv"]("vision_cls")):
        pass
    assert model.config.text_config._attn_implementation == "sdpa"  # detached: the model is restored


# ------------------------------------------------------------------ Qwen2-VL
@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("ranker", NEW)
def test_qwen2_vl_matches_reference(ranker: str, name: str) -> None:
    model = qwen_model("qwen2_vl", "sdpa", torch.float64)
    sample = qwen_sample(model, (8, 8), 2, 5, seed=47)
    schedule = SCHEDULES[name](ranker)
    with torch.no_grad():
        with sink_at_merger(model, 5) if ranker.startswith("nosink") else contextlib.nullcontext():
            ref = qwen_reference(model, sample, schedule)
            got, trace = _qwen_engine(model, sample, schedule)
    if ranker.startswith("nosink"):
        assert (5 in ref.kept[0]) == (ranker == "nosink_keep")
    assert [rec.kept[0].tolist() for rec in trace.boundaries] == ref.kept
    torch.testing.assert_close(got, ref.last_logits, atol=1e-8, rtol=0)


def _qwen_engine(model, sample, schedule):
    with apply_schedule(model, schedule) as trace:
        logits = model(**sample).logits[0, -1]
    return logits, trace


@contextlib.contextmanager
def sink_at_merger(model, token: int, scale: float = 1000.0) -> Iterator[None]:
    """As :func:`sink_at`, for Qwen2-VL's patch merger (the vision tower's last module)."""
    def hook(module, args, out):
        out = out.clone()
        out[token] *= scale
        return out

    handle = model.model.visual.merger.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# ---------------------------------------------------------------------- pool
def _staged_reference(model, embeds, ids, schedule, rope, choose):
    """One sample's pruned forward by hand: the layers of tests/reference.py, stage by stage,
    ``rope(cur, stage)`` giving the ``(cos, sin)`` of the tokens ``cur`` (original indices). At
    each boundary ``choose(s, hidden, q, k, cos, sin, cur, slot)`` (``q, k``: layer ``K-1``'s;
    ``slot``: image-token index -> row of ``hidden``) returns the kept image tokens, the states
    (changed or not) and what to report. Returns the kept sets, the reports and the last logits."""
    lm = model.model.language_model
    layers = list(lm.layers)
    image_id = int(model.config.image_token_id)
    ordinal = {p: j for j, p in enumerate(i for i, t in enumerate(ids) if t == image_id)}
    cur, hidden, kept, reports = list(range(len(ids))), embeds, [], []
    starts = [0, *schedule.boundaries, len(layers)]
    for s in range(len(starts) - 1):
        cos, sin = rope(cur, s)
        for li in range(starts[s], starts[s + 1]):
            hidden, q, k = layer_forward(layers[li], hidden, cos, sin)
        if s == len(schedule.boundaries):
            break
        slot = {ordinal[p]: i for i, p in enumerate(cur) if p in ordinal}
        keep, hidden, report = choose(s, hidden, q, k, cos, sin, cur, slot)
        select = [i for i, p in enumerate(cur) if p not in ordinal or ordinal[p] in set(keep)]
        hidden, cur = hidden[select], [cur[i] for i in select]
        kept.append(sorted(keep))
        reports.append(report)
    return kept, reports, model.lm_head(lm.norm(hidden))[-1]


def _pool_reference(model, embeds, ids, schedule, grids, rope):
    """``pool`` by hand: at each boundary the ``uniform`` tokens (lowest ``grid_priority`` per
    grid, ties to the earlier), every token present assigned by brute force to its nearest kept
    token on its grid (squared distance, ties to the earlier kept token; a grid without one: the
    nearest in the sequence), each kept token given the mean of its window by a loop. Reports
    the windows."""
    cells = [(g, r, c) for g, (h, w) in enumerate(grids) for r in range(h) for c in range(w)]
    priority = torch.cat([grid_priority(h, w) for h, w in grids]).tolist()
    order = sorted(range(len(cells)), key=lambda j: (priority[j], j))

    def choose(s, hidden, q, k, cos, sin, cur, slot):
        keep = sorted(order[: kept_count(len(cells), schedule.ratios[s])])

        def nearest(j: int) -> int:
            (g, r, c) = cells[j]
            same = [m for m in keep if cells[m][0] == g]
            if not same:
                return min(keep, key=lambda m: (abs(m - j), m))
            return min(same, key=lambda m: ((cells[m][1] - r) ** 2 + (cells[m][2] - c) ** 2, m))

        window: dict[int, list[int]] = {m: [] for m in keep}
        for j in sorted(slot):
            window[nearest(j)].append(j)
        pooled = hidden.clone()
        for rep, members in window.items():
            pooled[slot[rep]] = sum(hidden[slot[j]] for j in members) / len(members)
        return keep, pooled, window

    return _staged_reference(model, embeds, ids, schedule, rope, choose)


def _llava_case(model, ids, pv, positions="keep"):
    """``(embeds, ids, rope)`` of a LLaVA sample for :func:`_staged_reference` under ``positions``."""
    lm = model.model.language_model
    with torch.no_grad():
        embeds = merged_inputs_embeds(model, ids, pv)[0]

    def rope(cur, stage):
        pos = cur if positions == "keep" else list(range(len(cur)))
        cos, sin = lm.rotary_emb(embeds[None], position_ids=torch.tensor([pos]))
        return cos[0], sin[0]

    return embeds, ids[0].tolist(), rope


def _qwen_case(model, sample, positions="keep"):
    """As :func:`_llava_case` for a Qwen2-VL sample: HF's multimodal positions (``keep``) or the
    bounding-box renumbering (``compact``, tests/test_engine_qwen2_vl.py)."""
    lm = model.model.language_model
    with torch.no_grad():
        embeds, original = hf_language_inputs(model, sample)
    ids = sample["input_ids"][0].tolist()

    def rope(cur, stage):
        if positions == "keep" or stage == 0:
            pos = original[:, cur].tolist()
        else:
            pos = compact_reference(ids, cur, original, int(model.config.image_token_id))
        cos, sin = lm.rotary_emb(embeds[None], torch.tensor(pos)[:, None, :])
        return cos[0], sin[0]

    return embeds, ids, rope


POOL = {
    "drop-1": DropSchedule.drop(layer=1, ratio=0.25, ranker="pool"),  # the earliest boundary: before layer 1
    "fastv": DropSchedule.fastv(K=2, R=0.75, ranker="pool"),
    "pdrop-keep": DropSchedule.pdrop(**PDROP, ranker="pool", positions="keep"),
    "pdrop-compact": DropSchedule.pdrop(**PDROP, ranker="pool"),
    "odd": DropSchedule.pdrop((1, 3), ratios=(0.4, 0.1), ranker="pool"),
}


@pytest.mark.parametrize("n_images", [1, 2])
@pytest.mark.parametrize("name", list(POOL))
def test_pool_matches_reference(name: str, n_images: int) -> None:
    """LLaVA (one and two 4 x 4 images): the engine keeps the ``uniform`` tokens, each holding
    the mean of its window, as the hand loop does (kept indices, logits)."""
    model = tiny_model("llava", "qwen2", "sdpa")
    ids, pv, sizes = make_sample(model, seed=54 + n_images, n_images=n_images)
    schedule = POOL[name]
    embeds, plain, rope = _llava_case(model, ids, pv, schedule.positions)
    with torch.no_grad():
        kept, windows, last = _pool_reference(model, embeds, plain, schedule, [(4, 4)] * n_images, rope)
    logits, trace = run_engine(model, ids, pv, sizes, schedule)
    assert [rec.kept[0].tolist() for rec in trace.boundaries] == kept
    torch.testing.assert_close(logits[0, -1], last, atol=ATOL["sdpa"], rtol=0)
    if name == "fastv":  # a quarter of each 4 x 4 grid: the 2 x 2 blocks of average pooling
        blocks = {k + 16 * i: [k + 16 * i, k + 1 + 16 * i, k + 4 + 16 * i, k + 5 + 16 * i]
                  for i in range(n_images) for k in (0, 2, 8, 10)}
        assert windows[0] == blocks
    uniform, _ = run_engine(model, ids, pv, sizes, replace(schedule, ranker="uniform"))
    assert not torch.allclose(uniform[0, -1], logits[0, -1])  # the pooled states matter


@pytest.mark.parametrize("name", ["fastv", "pdrop-keep", "pdrop-compact"])
def test_pool_qwen2_vl_matches_reference(name: str) -> None:
    """Qwen2-VL: windows on the merged grid (an 8 x 12-patch image is 4 x 6 tokens); the pooled
    tokens carry their kept token's multimodal positions (``keep``) or the bounding-box
    renumbering (``compact``)."""
    model = qwen_model("qwen2_vl", "sdpa", torch.float64)
    sample = qwen_sample(model, (8, 12), 2, 5, seed=57)
    schedule = POOL[name]
    embeds, ids, rope = _qwen_case(model, sample, schedule.positions)
    with torch.no_grad():
        kept, _, last = _pool_reference(model, embeds, ids, schedule, [(4, 6)], rope)
        got, trace = _qwen_engine(model, sample, schedule)
    assert [rec.kept[0].tolist() for rec in trace.boundaries] == kept
    torch.testing.assert_close(got, last, atol=1e-8, rtol=0)


def test_pool_windows_stay_in_their_grid() -> None:
    """LLaVA-NeXT: the base image and the high-resolution grid are pooled apart; a grid left
    without a kept token joins the kept token nearest in the sequence."""
    cells = grid_cells([(2, 2), (2, 3)], 10)
    priority = torch.cat([grid_priority(2, 2), grid_priority(2, 3)])
    windows = pool_windows(cells, priority, [2, 1])
    assert windows[0].tolist() == [0, 0, 0, 0, 4, 4, 4, 4, 4, 4]  # one kept token per grid
    assert windows[1].tolist() == [0, -1, -1, -1, 0, -1, -1, -1, -1, -1]  # grid 2 joins token 0
    model = tiny_model("llava_next", "qwen2", "sdpa")
    ids, pv, sizes = make_sample(model, seed=58, image_hw=(56, 28))
    logits, trace = run_engine(model, ids, pv, sizes, POOL["fastv"])
    assert trace.kept_counts()[0] == list(POOL["fastv"].stage_counts(trace.n_image[0]))
    assert torch.isfinite(logits[0, -1]).all()


@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_pool_cached_generation_equals_recomputation(positions: str) -> None:
    """The pooled states enter each stage's cache: decoding with it equals the pooled prefill
    of the prompt and the tokens generated so far (``pool``'s choice ignores the text)."""
    from tests.helpers import engine_generate

    model = tiny_model("llava", "llama", "sdpa")
    ids, pv, _ = make_sample(model, seed=59, n_images=2)
    schedule = DropSchedule.pdrop(**PDROP, ranker="pool", positions=positions)
    new, logits, _, _ = engine_generate(model, schedule, 3, input_ids=ids, pixel_values=pv,
                                        attention_mask=torch.ones_like(ids))
    for step in range(3):
        longer = torch.cat([ids, new[:, :step]], dim=1)
        again, _ = run_engine(model, longer, pv, None, schedule)
        torch.testing.assert_close(logits[step], again[:, -1], atol=1e-8, rtol=0)


def test_pool_left_padded_batch() -> None:
    """Two LLaVA-NeXT samples of different image-token counts, left-padded: each row pools and
    keeps what it does alone."""
    model = tiny_model("llava_next", "qwen2", "sdpa")
    samples = [make_sample(model, image_hw=(56, 28), before=2, after=6, seed=61),
               make_sample(model, image_hw=(28, 56), before=5, after=3, seed=62)]
    width = max(sample[0].shape[1] for sample in samples)
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    for row, sample in enumerate(samples):
        ids[row, width - sample[0].shape[1]:], mask[row, width - sample[0].shape[1]:] = sample[0][0], 1
    schedule = POOL["pdrop-compact"]
    pv, sizes = torch.cat([s[1] for s in samples]), torch.cat([s[2] for s in samples])
    logits, trace = run_engine(model, ids, pv, sizes, schedule, attention_mask=mask,
                               position_ids=(mask.cumsum(1) - 1).clamp(min=0))
    assert trace.n_image[0] != trace.n_image[1]
    for row, (one, one_pv, one_sizes) in enumerate(samples):
        alone, single = run_engine(model, one, one_pv, one_sizes, schedule)
        assert [r.kept[row].tolist() for r in trace.boundaries] == [r.kept[0].tolist() for r in single.boundaries]
        torch.testing.assert_close(logits[row, -1], alone[0, -1], atol=1e-8, rtol=0)


# ---------------------------------------------------------------------- debias
def _reference_prior(model, cases, layers) -> dict[int, torch.Tensor]:
    """Per layer, ``[N]`` float64: the last token's attention over each image position in the
    unpruned forward by hand (every layer, every token), averaged over ``cases``."""
    image_id = int(model.config.image_token_id)
    sums = {layer: 0.0 for layer in layers}
    for embeds, ids, rope in cases:
        image = [i for i, t in enumerate(ids) if t == image_id]
        cos, sin = rope(list(range(len(ids))), 0)
        hidden = embeds
        for li, layer in enumerate(model.model.language_model.layers):
            hidden, q, k = layer_forward(layer, hidden, cos, sin)
            if li in sums:
                sums[li] = sums[li] + attention_row(q, k, len(ids) - 1, layer.self_attn.scaling)[image]
    return {layer: total / len(cases) for layer, total in sums.items()}


def _debias_reference(model, case, schedule, prior):
    """``debias`` by hand: at each boundary the eager ``last`` score (float64, the ranking layer's
    q/k) of each image token present divided by ``prior[layer][j]``; top ``floor(r N)``, ties to
    the earlier token. Reports the scores."""
    embeds, ids, rope = case
    layers = model.model.language_model.layers
    n = ids.count(int(model.config.image_token_id))

    def choose(s, hidden, q, k, cos, sin, cur, slot):
        boundary = schedule.boundaries[s]
        layer = boundary - 1 if schedule.rank_layer == "stage_last" else boundary
        if schedule.rank_layer == "next":
            q, k, _ = qkv(layers[boundary], hidden, cos, sin)
        att = attention_row(q, k, len(cur) - 1, layers[layer].self_attn.scaling)
        score = {j: float(att[i]) / max(float(prior[layer][j]), 1e-12) for j, i in slot.items()}
        keep = sorted(score, key=lambda j: (-score[j], j))[: kept_count(n, schedule.ratios[s])]
        return keep, hidden, score

    return _staged_reference(model, embeds, ids, schedule, rope, choose)


DEBIAS = {
    "fastv": DropSchedule.fastv(K=2, R=0.5, ranker="debias"),  # stage_last, positions kept
    "pdrop": DropSchedule.pdrop(**PDROP, ranker="debias"),  # next, compact
}


def _check_debias(model, case, calibration, inputs, schedule, run) -> None:
    """The engine's calibration on ``inputs`` equals the hand-made prior over the same samples
    (``calibration``, other than the ranked ``case``); ranked with it, the engine keeps and scores
    what the hand reference does and gives its logits. ``run(schedule, prior)``: the engine's last
    logits and trace on ``case``. (Scores of ``last`` would fail: the prior is not flat.)"""
    layers = ranking_layers(schedule)
    reference = _reference_prior(model, calibration, layers)
    values = calibrate(model, inputs, layers)
    for i, layer in enumerate(layers):
        torch.testing.assert_close(values[i].double(), reference[layer], atol=1e-7, rtol=0)
    with torch.no_grad():
        kept, scores, last = _debias_reference(model, case, schedule, reference)
    got, trace = run(schedule, Prior("test", layers, values))
    assert trace.prior == "test"
    assert [rec.kept[0].tolist() for rec in trace.boundaries] == kept
    for rec, score in zip(trace.boundaries, scores):
        expected = torch.tensor([score.get(j, float("nan")) for j in range(len(rec.scores[0]))], dtype=torch.float64)
        torch.testing.assert_close(rec.scores[0].double(), expected, rtol=1e-5, atol=0, equal_nan=True)
    torch.testing.assert_close(got, last, atol=1e-8, rtol=0)
    assert float(values.std(dim=1).min()) > 1e-3 * float(values.mean())


@pytest.mark.parametrize("name", list(DEBIAS))
def test_debias_matches_reference(name: str) -> None:
    """LLaVA: the prior over four calibration samples (not the ranked one), by the engine and by
    hand; ``debias`` ranks by ``last`` over it."""
    model = tiny_model("llava", "qwen2", "sdpa")
    schedule = DEBIAS[name]
    samples = [make_sample(model, seed=60 + i) for i in range(5)]
    cases = [_llava_case(model, ids, pv, schedule.positions) for ids, pv, _ in samples]
    inputs = [{"input_ids": ids, "pixel_values": pv} for ids, pv, _ in samples[1:]]
    ids, pv, _ = samples[0]

    def run(sched, prior):
        with torch.no_grad(), apply_schedule(model, sched, prior=prior) as trace:
            logits = model(input_ids=ids, pixel_values=pv).logits[0, -1]
        return logits, trace

    _check_debias(model, cases[0], cases[1:], inputs, schedule, run)


@pytest.mark.parametrize("name", list(DEBIAS))
def test_debias_qwen2_vl_matches_reference(name: str) -> None:
    model = qwen_model("qwen2_vl", "sdpa", torch.float64)
    schedule = DEBIAS[name]
    samples = [qwen_sample(model, (8, 8), 2, 5, seed=64 + i) for i in range(4)]
    cases = [_qwen_case(model, sample, schedule.positions) for sample in samples]

    def run(sched, prior):
        with torch.no_grad(), apply_schedule(model, sched, prior=prior) as trace:
            logits = model(**samples[0]).logits[0, -1]
        return logits, trace

    _check_debias(model, cases[0], cases[1:], samples[1:], schedule, run)


# ---------------------------------------------------------------------- FLOPs
def test_ranking_flops_by_hand() -> None:
    dims = get_preset("llava-1.5-7b")
    d, kv, t = dims.hidden, dims.kv_dim, dims.n_text
    fastv = lambda r: DropSchedule.fastv(K=2, R=0.5, ranker=r)  # noqa: E731
    last = ranking_flops(dims, fastv("last"))
    assert last == (t + 576) * d
    assert ranking_flops(dims, fastv("mean"), n_query=5) == (5 + 576) * (t + 576) * d
    assert ranking_flops(dims, fastv("norope")) == last + 2 * (d + (t + 576) * kv)
    assert ranking_flops(dims, fastv("nosink")) == ranking_flops(dims, fastv("nosink_keep")) == last + 576 * d
    assert ranking_flops(dims, fastv("vision_cls")) == 1024 * 1024 + 577 * 1024 * 1024 + 577 * 1024
    assert ranking_flops(dims, DropSchedule.pdrop(ranker="vision_cls")) == ranking_flops(dims, fastv("vision_cls"))
    nxt = DropSchedule.fastv(K=2, R=0.5, ranker="mean", rank_layer="next")
    assert ranking_flops(dims, nxt) == 577 * (t + 576) * d + 577 * d * d + (t + 576) * d * kv
    assert ranking_flops(dims, fastv("pool")) == (576 + 288) * d  # sums into windows, divisions
    assert ranking_flops(dims, DropSchedule.pdrop(ranker="pool")) == (576 + 288 + 288 + 144 + 144 + 72) * d
    assert ranking_flops(dims, fastv("uniform")) == 0


# ---------------------------------------------------------------- grid runner
def test_shared_grid_equals_separate_runs(tmp_path, monkeypatch) -> None:
    """The sweep's shared-prefix runner (replayed first stage, images encoded once) gives every
    new ranker what separate runs give (``debias`` calibrating its prior on first use)."""
    from redundancy.data import load_dataset
    from redundancy.grid import run_grid
    from redundancy.loading import TEST_SET, load_model

    try:
        from tests.helpers import save_tiny_micro
    except ImportError:
        from test_grid import save_tiny_micro

    model, processor = load_model(save_tiny_micro(tmp_path / "micro"))
    samples = load_dataset(TEST_SET)[:4]
    monkeypatch.setenv("REDUNDANCY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("REDUNDANCY_PRIOR_IMAGES", "2")
    monkeypatch.delenv("REDUNDANCY_PRIOR", raising=False)
    rankers = (*NEW, "vision_cls", "pool", "debias")
    grid = [DropSchedule.vanilla(), *(DropSchedule.drop(3, 0.25, ranker=r) for r in rankers),
            DropSchedule.pdrop(layers=(2, 4), lam=0.5, ranker="norope")]
    opts = {"batch_size": 2, "progress": False}
    shared, stats = run_grid(model, processor, samples, grid, share=True, **opts)
    separate, _ = run_grid(model, processor, samples, grid, share=False, **opts)
    assert stats.prefix_hits == 2 * (len(grid) - 1) and stats.prefix_misses == 0
    for schedule, a, b in zip(grid, shared, separate):
        assert [r.prediction for r in a] == [r.prediction for r in b], schedule
        assert [r.kept for r in a] == [r.kept for r in b], schedule
