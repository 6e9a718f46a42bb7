"""The engine's work per decoding step, per boundary and per prefill (issue 32).

1. Decoding: one rotary computation and one validity write per step for every stage
   together; no stage mask is rebuilt and no validity mask concatenated per step, so the
   Python work per token does not grow with the number of stages or the tokens decoded.
2. ``rank_layer="next"``: layer K's input norm and key projection of the kept tokens come
   from the ranking that already computed them for every token (same numbers).
3. Prefill: nothing reads a device value on the host between the first and the last layer
   (CPU proxy: ``.item()``, ``.tolist()``, ``bool()``, ``.cpu()``, host-built tensors are
   counted), with or without a trace; the trace is copied to the host when read.

Correctness of the generations themselves is covered by the reference tests
(``test_engine_cache.py``, ``test_engine_reference.py``, ``test_engine_contract.py``).
"""

from __future__ import annotations

import collections
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import redundancy.engine as engine_module
from redundancy.engine import DropEngine, apply_schedule
from redundancy.schedule import DropSchedule
from tests.helpers import engine_generate, make_batch, tiny_model

NEXT_TOKENS = 7
PADDED_NEXT = dict(specs=[(3, 5), (1, 3)], image_hw=[(28, 56), (56, 56)])  # rows of different lengths and counts


def _next_batch(model: Any) -> dict[str, torch.Tensor]:
    return make_batch(model, PADDED_NEXT["specs"], image_hw=PADDED_NEXT["image_hw"])


# ------------------------------------------------------------------ 1 decode
class _DecodeCounter:
    """Counts, during the decoding steps only, the rotary calls, the engine's stage-mask
    builds and the ``torch.cat`` calls made from ``redundancy/engine.py``."""

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.decoding = False
        rotary = model.model.language_model.rotary_emb
        self.handle = rotary.register_forward_pre_hook(lambda *_: self._hit("rotary"))
        build_mask = DropEngine._mask
        decode = DropEngine._decode
        cat = torch.cat

        def counted_mask(engine: DropEngine, *args: Any, **kwargs: Any) -> Any:
            self._hit("mask")
            return build_mask(engine, *args, **kwargs)

        def counted_decode(engine: DropEngine, *args: Any, **kwargs: Any) -> Any:
            self.decoding = True
            self._hit("steps")
            try:
                return decode(engine, *args, **kwargs)
            finally:
                self.decoding = False

        def counted_cat(*args: Any, **kwargs: Any) -> Any:
            if sys._getframe(1).f_code.co_filename == engine_module.__file__:
                self._hit("engine cat")
            return cat(*args, **kwargs)

        monkeypatch.setattr(DropEngine, "_mask", counted_mask)
        monkeypatch.setattr(DropEngine, "_decode", counted_decode)
        monkeypatch.setattr(torch, "cat", counted_cat)

    def _hit(self, name: str) -> None:
        if self.decoding or name == "steps":
            self.counts[name] += 1


@pytest.mark.parametrize("positions", ["keep", "compact"])
@pytest.mark.parametrize("boundaries", [(2,), (1, 2, 3)])
def test_decode_step_work_does_not_grow_with_stages(boundaries: tuple[int, ...], positions: str, monkeypatch) -> None:
    """A left-padded batch (masks needed) under 2 and 4 stages: each decoding step makes one
    rotary call, builds no stage mask and concatenates nothing in the engine."""
    model = tiny_model("llava_next", "llama", "sdpa")
    schedule = DropSchedule.pdrop(layers=boundaries, ratios=(0.5, 0.25, 0.1)[: len(boundaries)], positions=positions)
    counter = _DecodeCounter(model, monkeypatch)
    try:
        engine_generate(model, schedule, NEXT_TOKENS, **_next_batch(model))
    finally:
        counter.handle.remove()
    steps = counter.counts["steps"]
    assert steps == NEXT_TOKENS - 1  # the first token comes from the prefill
    assert counter.counts["rotary"] == steps, counter.counts
    assert counter.counts["mask"] == 0, counter.counts
    assert counter.counts["engine cat"] == 0, counter.counts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_decode_masks_grow_in_chunks(attn: str, monkeypatch) -> None:
    """With a chunk of 2 slots the validity buffer grows several times during the generation;
    tokens and logits are the same as with the default chunk (every step's mask is right)."""
    model = tiny_model("llava_next", "llama", attn)
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, positions="compact")
    batch = _next_batch(model)
    tokens, logits, _, _ = engine_generate(model, schedule, NEXT_TOKENS, **batch)
    monkeypatch.setattr(engine_module._DecodeMasks, "chunk", 2)
    made: list[Any] = []
    init = engine_module._DecodeMasks.__init__
    monkeypatch.setattr(engine_module._DecodeMasks, "__init__", lambda self, *a: (made.append(self), init(self, *a))[1])
    tokens2, logits2, _, _ = engine_generate(model, schedule, NEXT_TOKENS, **batch)
    masks = made[-1]
    assert masks.used == NEXT_TOKENS - 1 and masks.valid.shape[-1] > masks.width + 2  # it grew
    assert torch.equal(tokens, tokens2)
    torch.testing.assert_close(logits, logits2, atol=1e-6, rtol=0)


# --------------------------------------------------------- 2 ranking reuse
def _linear_calls(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[int]:
    """Counts ``nn.Linear.forward`` calls per module id (the computation, not a substitute)."""
    calls: collections.Counter[int] = collections.Counter()
    forward = torch.nn.Linear.forward

    def counted(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        calls[id(module)] += 1
        return forward(module, x)

    monkeypatch.setattr(torch.nn.Linear, "forward", counted)
    return calls


@pytest.mark.parametrize("family,text", [("llava", "llama"), ("llava_next", "qwen2"), ("llava", "mistral")])
def test_next_layer_ranking_reuses_the_kept_projections(family: str, text: str, monkeypatch) -> None:
    """PyramidDrop's official ranking (layer K's norm and q/k on the states leaving layer K-1):
    layer K's key projection is computed once per prefill (by the ranking, for every token),
    not again for the kept tokens; kept indices, logits and generated tokens are those of a
    run that recomputes them."""
    model = tiny_model(family, text, "sdpa")
    batch = _next_batch(model) if family == "llava_next" else make_batch(model, [(3, 5), (1, 3)])
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, rank_layer="next")

    def run() -> tuple[torch.Tensor, list[list[torch.Tensor]], torch.Tensor]:
        with torch.no_grad(), apply_schedule(model, schedule) as trace:
            logits = model(**batch).logits
            kept = [record.kept for record in trace.boundaries]
            tokens = model.generate(**batch, max_new_tokens=4, do_sample=False)
        return logits, kept, tokens

    calls = _linear_calls(monkeypatch)
    with torch.no_grad(), apply_schedule(model, schedule):
        model(**batch)
    layers = model.model.language_model.layers
    for k in schedule.boundaries:
        assert calls[id(layers[k].self_attn.k_proj)] == 1, f"layer {k}: key projection computed twice"
        assert calls[id(layers[k].self_attn.q_proj)] == 2  # the query rows, then the layer's own
    reused = run()
    monkeypatch.setattr(engine_module, "_reusing", lambda layer, inputs: contextlib.nullcontext())
    recomputed = run()
    torch.testing.assert_close(reused[0], recomputed[0], atol=1e-6, rtol=0)
    assert all(torch.equal(a, b) for ra, rb in zip(reused[1], recomputed[1]) for a, b in zip(ra, rb))
    assert torch.equal(reused[2], recomputed[2])


def test_training_ranks_without_reuse() -> None:
    """With autograd on (training) layer K computes its own projections (the ranking runs
    without autograd), so gradients reach every weight as before."""
    model = tiny_model("llava", "llama", "sdpa")
    batch = make_batch(model, [(3, 5), (1, 3)])
    with apply_schedule(model, DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5)):
        loss = model(**batch).logits.float().pow(2).mean()
    grads = torch.autograd.grad(loss, [model.model.language_model.layers[2].self_attn.k_proj.weight])
    assert grads[0].abs().sum() > 0


# ---------------------------------------------------------- 3 host syncs
_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@contextlib.contextmanager
def _host_reads(model: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[collections.Counter[str]]:
    """Counts host reads of tensors (and tensors built from host data) made while the decoder
    layers of a prefill run: from the first layer's start to the last layer's end."""
    counts: collections.Counter[str] = collections.Counter()
    active = [False]

    def counting(name: str, fn: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            empty = name in ("tensor", "as_tensor") and isinstance(args[0], (list, tuple)) and not args[0]
            if active[0] and not empty:  # (an empty tensor copies nothing: HF's cache layers start so)
                frame = sys._getframe(1)
                counts[f"{name} at {frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}"] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name in _HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    for name in ("tensor", "as_tensor"):
        monkeypatch.setattr(torch, name, counting(name, getattr(torch, name)))
    layers = model.model.language_model.layers
    first = layers[0].register_forward_pre_hook(lambda *_: active.__setitem__(0, True))
    last = layers[-1].register_forward_hook(lambda *_: active.__setitem__(0, False))
    try:
        yield counts
    finally:
        first.remove()
        last.remove()
        active[0] = False


SYNC_CASES = {
    "pdrop-next": DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5),
    "fastv": DropSchedule.fastv(K=2, R=0.5),
    "pdrop-instruction-compact": DropSchedule.pdrop(layers=(1, 3), lam=0.5, ranker="instruction", positions="compact"),
    "random": DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="random"),
    "uniform": DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="uniform"),
}


@pytest.mark.parametrize("trace", [False, True])
@pytest.mark.parametrize("case", list(SYNC_CASES))
def test_prefill_reads_nothing_on_the_host_between_layers(case: str, trace: bool, monkeypatch) -> None:
    model = tiny_model("llava_next", "llama", "sdpa")
    batch = _next_batch(model)
    schedule = SYNC_CASES[case]
    with torch.no_grad(), apply_schedule(model, schedule, trace=trace, record_attention=(1,)) as recorded:
        with _host_reads(model, monkeypatch) as counts:
            model(**batch, use_cache=True)
        assert not counts, dict(counts)
        if trace:  # the records were kept on the device and are copied now
            assert len(recorded.boundaries) == len(schedule.boundaries)
            counts_per_row = [[len(r.kept[row]) for r in recorded.boundaries] for row in range(2)]
            assert counts_per_row == [c[1:] for c in recorded.kept_counts()]
            assert recorded.attention[1][0].shape == (recorded.n_image[0],)


def test_the_host_read_counter_sees_a_sync() -> None:
    """The proxy counts what it should: a ``.item()`` inside a layer is seen."""
    model = tiny_model("llava", "llama", "sdpa")
    batch = make_batch(model, [(3, 5)])
    layer = model.model.language_model.layers[1]

    def read(module: Any, args: Any, out: torch.Tensor) -> None:
        out.sum().item()

    handle = layer.register_forward_hook(read)
    try:
        with pytest.MonkeyPatch.context() as mp, torch.no_grad(), _host_reads(model, mp) as counts:
            model(**batch)
    finally:
        handle.remove()
    assert sum(v for k, v in counts.items() if k.startswith("item")) == 1
