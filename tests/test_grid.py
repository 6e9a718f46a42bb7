"""The shared-prefix grid runner gives exactly what separate runs give (redundancy/grid.py)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from redundancy.data import Sample, load_dataset
from redundancy.evaluate import predict
from redundancy.grid import SharedPrefix, encode, generate_chunk, run_grid, time_prefill
from redundancy.loading import TEST_SET, load_model
from redundancy.models import adapter_for
from redundancy.schedule import DropSchedule
from tests.helpers import save_tiny_micro


@pytest.fixture(scope="module")
def micro(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    return load_model(save_tiny_micro(tmp_path_factory.mktemp("tiny-micro")))


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    return load_dataset(TEST_SET)[:10]


GRID = [
    DropSchedule.vanilla(),
    *(DropSchedule.drop(k, r) for k in (1, 3, 5) for r in (0.0, 0.5, 1.0)),
    DropSchedule.drop(3, 0.25, ranker="random"),
    DropSchedule.drop(3, 0.25, ranker="uniform"),
    DropSchedule.drop(5, 0.25, ranker="inverse", positions="compact"),
    DropSchedule.drop(3, 0.25, ranker="instruction", rank_layer="next", positions="compact"),
    DropSchedule.fastv(K=3, R=0.5),
    DropSchedule.pdrop(layers=(2, 4), lam=0.5),
]


def test_shared_grid_equals_separate_runs(micro: tuple[Any, Any], samples: list[Sample]) -> None:
    model, processor = micro
    opts: dict[str, Any] = {"batch_size": 4, "keep_logits": True, "progress": False}  # batches of 4, 4, 2
    encoded: list[int] = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: encoded.append(1))
    try:
        shared, stats = run_grid(model, processor, samples, GRID, share=True, **opts)
        assert len(encoded) == 3  # the images of each batch were encoded once for the whole grid
        separate, _ = run_grid(model, processor, samples, GRID, share=False, **opts)
        assert len(encoded) == 3 + 3 * len(GRID)
    finally:
        hook.remove()
    branches = sum(not s.is_vanilla for s in GRID)
    assert stats.prefix_hits == 3 * branches and stats.prefix_misses == 0  # every branch of every batch replayed
    for schedule, a, b in zip(GRID, shared, separate):
        assert [r.question_id for r in a] == [s.question_id for s in samples]
        assert [r.prediction for r in a] == [r.prediction for r in b], schedule
        assert [r.kept for r in a] == [r.kept for r in b], schedule
        assert [r.n_text for r in a] == [r.n_text for r in b], schedule
        for ra, rb in zip(a, b):
            assert ra.logits is not None and rb.logits is not None
            # Bitwise, at every generated step (steps after the first read the replayed caches).
            assert torch.equal(ra.logits, rb.logits), schedule


def test_dropping_changes_the_logits(micro: tuple[Any, Any], samples: list[Sample]) -> None:
    """The equivalence above is not vacuous: the grid's points do compute different things."""
    model, processor = micro
    out, _ = run_grid(model, processor, samples[:4], [DropSchedule.vanilla(), DropSchedule.drop(1, 0.0)],
                      keep_logits=True, progress=False)
    diffs = [(a.logits[0] - b.logits[0]).abs().max().item() for a, b in zip(*out)]  # type: ignore[index]
    assert min(diffs) > 1e-3


def test_grid_answers_like_predict(micro: tuple[Any, Any], samples: list[Sample]) -> None:
    model, processor = micro
    schedule = DropSchedule.drop(3, 0.5)
    out, _ = run_grid(model, processor, samples, [schedule], share=False, batch_size=4, progress=False)
    assert [r.prediction for r in out[0]] == predict(model, processor, samples, schedule=schedule, batch_size=4,
                                                     progress=False)


def test_todo_and_batch_callback(micro: tuple[Any, Any], samples: list[Sample]) -> None:
    model, processor = micro
    schedules = [DropSchedule.vanilla(), DropSchedule.drop(2, 0.5), DropSchedule.drop(4, 0.5)]
    ids = [s.question_id for s in samples]
    todo = [set(), set(ids[4:]), set(ids)]  # vanilla done; the second point has its first batch
    calls: list[tuple[int, int, bool]] = []
    out, stats = run_grid(model, processor, samples, schedules, batch_size=4, todo=todo, progress=False,
                          on_batch=lambda i, res, sec, shared: calls.append((i, len(res), shared)))
    assert out[0] == [] and [r.question_id for r in out[1]] == ids[4:] and len(out[2]) == len(ids)
    assert calls == [(2, 4, False), (1, 4, True), (2, 4, True), (1, 2, True), (2, 2, True)]
    assert stats.prefix_hits == 4 and stats.trunk_seconds > 0  # the trunk stopped after recording


def test_replay_refuses_other_inputs(micro: tuple[Any, Any], samples: list[Sample]) -> None:
    """A prefix recorded on one batch is never replayed for another: the branch recomputes."""
    model, processor = micro
    device = next(model.parameters()).device
    schedule = DropSchedule.drop(3, 0.5)
    prefix = SharedPrefix((3,))
    with torch.no_grad():
        first = encode(processor, samples[:2], device)
        generate_chunk(model, processor, first, samples[:2], DropSchedule.vanilla(), 4, False, prefix)
        prefix.recording = False
        other = encode(processor, samples[2:4], device)
        got = generate_chunk(model, processor, other, samples[2:4], schedule, 4, True, prefix)
        ref = generate_chunk(model, processor, other, samples[2:4], schedule, 4, True)
    assert (prefix.hits, prefix.misses) == (0, 1)
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(got, ref))  # type: ignore[arg-type]


def test_time_prefill_pairs_each_round_with_the_unmodified_model(micro: tuple[Any, Any], samples: list[Sample]) -> None:
    model, processor = micro
    lm = adapter_for(model).language_model
    engaged: list[bool] = []  # per prefill: did the drop engine run it
    hook = model.register_forward_pre_hook(lambda *_: engaged.append("forward" in lm.__dict__))
    try:
        timing = time_prefill(model, processor, samples[:1], DropSchedule.drop(2, 0.5), repeats=2, warmup=1)
        assert engaged == [False, True, True, False, False, True]  # which goes first alternates
        assert timing.rounds == 2 and timing.ms > 0 and timing.vanilla_ms > 0 and timing.speedup > 0
        engaged.clear()
        vanilla = time_prefill(model, processor, samples[:1], DropSchedule.vanilla(), repeats=3, warmup=0)
        assert engaged == [False] * 3  # the unmodified model, once per round
        assert vanilla.speedup == 1.0 and vanilla.ms == vanilla.vanilla_ms
    finally:
        hook.remove()
