"""The ranking scores beyond ``last`` / ``instruction`` (docs/method.md section 3): ``mean``,
``norope``, ``nosink`` / ``nosink_keep``, against the slow reference (tests/reference.py) on tiny
LLaVA, LLaVA-NeXT and Qwen2-VL models under SDPA: kept image tokens, scores and logits.
Plus the power checks (each score changes what is kept), schedule records and FLOPs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.flops import ranking_flops
from redundancy.presets import get_preset
from redundancy.ranking import SINK_NORM_RATIO
from redundancy.schedule import RANKERS, DropSchedule

try:
    from tests.reference import SINK_RATIO, make_sample, reference_run, tiny_model
    from tests.test_engine_qwen2_vl import qwen_model
    from tests.test_engine_qwen2_vl import reference_run as qwen_reference
    from tests.test_engine_qwen2_vl import make_sample as qwen_sample
    from tests.test_engine_reference import ATOL, check_row, compare, run_engine
    from tests.test_engine_training import with_answers
except ImportError:  # tests/ is not a package: pytest puts it on sys.path
    from reference import SINK_RATIO, make_sample, reference_run, tiny_model
    from test_engine_qwen2_vl import qwen_model
    from test_engine_qwen2_vl import reference_run as qwen_reference
    from test_engine_qwen2_vl import make_sample as qwen_sample
    from test_engine_reference import ATOL, check_row, compare, run_engine
    from test_engine_training import with_answers

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
    assert {*NEW, "vision_cls"} <= set(RANKERS)
    for ranker in (*NEW, "vision_cls"):
        assert DropSchedule.drop(layer=2, ratio=0.5, ranker=ranker).record()["ranker"] == ranker
    assert SINK_RATIO == SINK_NORM_RATIO  # the reference's threshold is the documented one


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


# ---------------------------------------------------------------- grid runner
def test_shared_grid_equals_separate_runs(tmp_path) -> None:
    """The sweep's shared-prefix runner (replayed first stage, images encoded once) gives every
    new ranker what separate runs give."""
    from redundancy.loading import TEST_SET, load_model
    from redundancy.data import load_dataset
    from redundancy.grid import run_grid

    try:
        from tests.test_grid import save_tiny_micro
    except ImportError:
        from test_grid import save_tiny_micro

    model, processor = load_model(save_tiny_micro(tmp_path / "micro"))
    samples = load_dataset(TEST_SET)[:4]
    grid = [DropSchedule.vanilla(), *(DropSchedule.drop(3, 0.25, ranker=r) for r in (*NEW, "vision_cls")),
            DropSchedule.pdrop(layers=(2, 4), lam=0.5, ranker="norope")]
    opts = {"batch_size": 2, "progress": False}
    shared, stats = run_grid(model, processor, samples, grid, share=True, **opts)
    separate, _ = run_grid(model, processor, samples, grid, share=False, **opts)
    assert stats.prefix_hits == 2 * (len(grid) - 1) and stats.prefix_misses == 0
    for schedule, a, b in zip(grid, shared, separate):
        assert [r.prediction for r in a] == [r.prediction for r in b], schedule
        assert [r.kept for r in a] == [r.kept for r in b], schedule
