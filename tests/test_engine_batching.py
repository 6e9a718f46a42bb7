"""A batched run equals the same samples run one by one (issue test 2)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from redundancy import engine
from redundancy.engine import apply_schedule
from redundancy.schedule import DropSchedule
from tests.helpers import make_batch, select_rows, tiny_model

CASES = [
    pytest.param("llava", DropSchedule.fastv(K=2, R=0.5), id="llava-fastv"),
    pytest.param("llava", DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5), id="llava-pdrop"),
    pytest.param("llava", DropSchedule.pdrop(layers=(1, 3), lam=0.5, positions="keep", ranker="instruction"),
                 id="llava-instr"),
    pytest.param("llava", DropSchedule.drop(layer=2, ratio=0.3, ranker="random", seed=3), id="llava-random"),
    pytest.param("llava", DropSchedule.drop(layer=2, ratio=0.3, ranker="uniform"), id="llava-uniform"),
    pytest.param("llava", DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="random", seed=1),
                 id="llava-pdrop-random"),
    pytest.param("llava_next", DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5), id="next-pdrop"),
    pytest.param("llava_next", DropSchedule.fastv(K=2, R=0.75, ranker="inverse"), id="next-fastv-inverse"),
    pytest.param("llava_next", DropSchedule.drop(layer=1, ratio=0.5, ranker="uniform"), id="next-uniform"),
]


@pytest.mark.parametrize(("family", "schedule"), CASES)
def test_batched_equals_one_by_one(family: str, schedule: DropSchedule) -> None:
    model = tiny_model(family, "mistral", "sdpa", torch.float64)
    sizes = [(28, 56), (56, 56), (56, 28)] if family == "llava_next" else None
    batch = make_batch(model, [(3, 6), (1, 4), (2, 2)], image_hw=sizes, seed=1)
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        gen = model.generate(**batch, max_new_tokens=6, do_sample=False)
        kept = [[b.kept[i] for b in trace.boundaries] for i in range(3)]
        counts = trace.kept_counts()
        for row in range(3):
            single = select_rows(batch, row)
            gen1 = model.generate(**single, max_new_tokens=6, do_sample=False)
            assert torch.equal(gen1[0, single["input_ids"].shape[1] :], gen[row, batch["input_ids"].shape[1] :])
            assert trace.kept_counts()[0] == counts[row]
            for b, record in enumerate(trace.boundaries):
                assert torch.equal(record.kept[0], kept[row][b]), (row, b)
    if family == "llava_next":
        assert len({c[0] for c in counts}) > 1, "rows should hold different image-token counts"


def test_next_layout_reaches_the_uniform_control_under_generate() -> None:
    """``generate`` encodes LLaVA-NeXT images itself and calls the forward without
    ``image_sizes``; the uniform control must still see each image's crop grid, so the
    tokens it keeps under ``generate`` are those of a plain forward."""
    model = tiny_model("llava_next")
    batch = make_batch(model, [(3, 4), (2, 5)], image_hw=[(40, 60), (60, 30)])
    schedule = DropSchedule.drop(layer=2, ratio=0.5, ranker="uniform")
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        model(**batch)
        forward_kept = [k.clone() for k in trace.boundaries[0].kept]
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        generate_kept = trace.boundaries[0].kept
    for fwd, gen in zip(forward_kept, generate_kept):
        assert torch.equal(fwd, gen)


def _general_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn off every shortcut the prefill takes from what it knows on the host (the query row
    at the last slot, rows ending in a text token, layouts without padding, a batch of one):
    the general tensor paths run instead."""
    read = engine.DropEngine._read_layout
    monkeypatch.setattr(engine.DropEngine, "_read_layout", staticmethod(
        lambda *masks: dataclasses.replace(read(*masks), ends_in_text=False, query_at_end=False)
    ))
    relayout, first = engine.DropEngine._relayout, engine.DropEngine._first_position
    monkeypatch.setattr(engine.DropEngine, "_relayout", staticmethod(lambda keep, m, _: relayout(keep, m, False)))
    monkeypatch.setattr(engine.DropEngine, "_first_position", staticmethod(lambda p, v, _: first(p, v, False)))
    monkeypatch.setattr(engine, "gather_rows", lambda x, i: x.gather(1, i[..., None].expand(-1, -1, x.shape[-1])))


@pytest.mark.parametrize(("family", "schedule"), [CASES[0], CASES[1], CASES[2], CASES[6]])
@pytest.mark.parametrize("rows", [[(3, 6)], [(3, 6), (1, 4), (2, 2)]], ids=["one", "padded"])
def test_host_shortcuts_give_the_general_paths_numbers(
    monkeypatch: pytest.MonkeyPatch, family: str, schedule: DropSchedule, rows: list[tuple[int, int]]
) -> None:
    model = tiny_model(family, "mistral", "sdpa", torch.float64)
    sizes = [(28, 56), (56, 56), (56, 28)][: len(rows)] if family == "llava_next" else None
    batch = make_batch(model, rows, image_hw=sizes, seed=1)

    def run() -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
        with torch.no_grad(), apply_schedule(model, schedule) as trace:
            logits = model(**batch, logits_to_keep=1).logits
            gen = model.generate(**batch, max_new_tokens=4, do_sample=False)
            return logits, gen, [b.kept for b in trace.boundaries]

    fast = run()
    with monkeypatch.context() as patch:
        _general_paths(patch)
        general = run()
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
    assert all(torch.equal(a, b) for fa, ga in zip(fast[2], general[2]) for a, b in zip(fa, ga))
