"""The bench's references (redundancy/staged.py) compute what the engine computes on the same tokens."""

from __future__ import annotations

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.schedule import DropSchedule
from redundancy.staged import fastv_eager_plan, ideal_plan, staged
from tests.helpers import make_batch, tiny_model


def _greedy(model, inputs, steps: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Prefill then ``steps`` cached greedy steps (as the bench runs them): tokens and each step's logits."""
    with torch.no_grad():
        out = model(**inputs, use_cache=True, logits_to_keep=1)
        cache, logits = out.past_key_values, [out.logits[:, -1]]
        token = logits[-1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(steps):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            logits.append(out.logits[:, -1])
            token = logits[-1].argmax(-1, keepdim=True)
            tokens.append(token)
    return torch.cat(tokens, 1), logits


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("positions", ["keep", "compact"])
def test_ideal_equals_the_engine(family: str, positions: str) -> None:
    model = tiny_model(family, "llama", "sdpa")
    sizes = [(28, 56), (28, 56)] if family == "llava_next" else None
    inputs = make_batch(model, [(3, 5), (3, 5)], image_hw=sizes, seed=3)
    inputs.pop("attention_mask")
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, positions=positions)
    plan = ideal_plan(model, inputs, schedule)
    assert [p.shape[1] for p in plan.positions] == sorted((p.shape[1] for p in plan.positions), reverse=True)
    with apply_schedule(model, schedule, trace=False):
        tokens, logits = _greedy(model, inputs, 4)
    with staged(model, plan):
        tokens2, logits2 = _greedy(model, inputs, 4)
    assert torch.equal(tokens, tokens2)
    for a, b in zip(logits, logits2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fastv_eager_keeps_what_the_engine_keeps() -> None:
    """The peer ranks from layer K-1's materialised eager attention; the engine inside the SDPA call:
    the same tokens, the same logits."""
    model = tiny_model("llava", "llama", "sdpa")
    inputs = make_batch(model, [(3, 5), (3, 5)], seed=4)
    inputs.pop("attention_mask")
    with apply_schedule(model, DropSchedule.fastv(K=2, R=0.5), trace=False):
        tokens, logits = _greedy(model, inputs, 4)
    with staged(model, fastv_eager_plan(model, inputs, K=2, R=0.5)):
        tokens2, logits2 = _greedy(model, inputs, 4)
    assert torch.equal(tokens, tokens2)
    for a, b in zip(logits, logits2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert model.config.text_config._attn_implementation == "sdpa"


def test_staged_refuses_padding() -> None:
    model = tiny_model("llava", "llama", "sdpa")
    inputs = make_batch(model, [(3, 5), (1, 3)])
    with pytest.raises(ValueError, match="padding"):
        ideal_plan(model, inputs, DropSchedule.fastv(K=2, R=0.5))
