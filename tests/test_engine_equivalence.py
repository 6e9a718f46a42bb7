"""Keep ratio 1 and an empty schedule reproduce the unmodified HF model (issue test 1)."""

from __future__ import annotations

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.schedule import DropSchedule
from tests.helpers import make_batch, tiny_model

NEXT_SIZES = [(28, 56), (56, 56)]

SCHEDULES = [
    pytest.param(DropSchedule.vanilla(), id="empty"),
    pytest.param(DropSchedule.drop(layer=2, ratio=1.0), id="drop-r1"),
    pytest.param(DropSchedule.fastv(K=1, R=0.0), id="fastv-R0"),
    pytest.param(DropSchedule.pdrop(layers=(1, 2, 3), lam=1.0), id="pdrop-lam1-next-compact"),
    pytest.param(DropSchedule.pdrop(layers=(1, 3), lam=1.0, rank_layer="stage_last", positions="keep"),
                 id="pdrop-lam1-keep"),
]


@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_keep_all_matches_unmodified_model(family: str, attn: str, batch_size: int, schedule: DropSchedule) -> None:
    model = tiny_model(family, "llama", attn)
    specs = [(3, 5), (1, 3)][:batch_size]
    batch = make_batch(model, specs, image_hw=NEXT_SIZES[:batch_size] if family == "llava_next" else None)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch).logits
        ref_gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        with apply_schedule(model, schedule) as trace:
            out = model(**batch).logits
            gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert out.shape == ref.shape
    diff = (out - ref)[valid].abs().max().item()
    assert diff < 1e-5, f"max logit difference {diff}"
    assert torch.equal(gen, ref_gen)
    if not schedule.is_vanilla:
        assert all(len(set(c)) == 1 for c in trace.kept_counts()), trace.kept_counts()


def test_model_restored_after_context() -> None:
    model = tiny_model("llava", "llama", "sdpa")
    batch = make_batch(model, [(2, 4)])
    lm = model.model.language_model
    with torch.no_grad():
        before = model(**batch).logits
        with pytest.raises(RuntimeError, match="boom"):
            with apply_schedule(model, DropSchedule.drop(layer=2, ratio=0.0)):
                raise RuntimeError("boom")
        after = model(**batch).logits
    assert "forward" not in vars(lm)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert torch.equal(before, after)


@pytest.mark.parametrize("text", ["mistral", "qwen2"])
def test_gqa_backbones_keep_all(text: str) -> None:
    model = tiny_model("llava", text, "sdpa")
    batch = make_batch(model, [(3, 5), (1, 3)])
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch).logits
        with apply_schedule(model, DropSchedule.pdrop(layers=(1, 2, 3), lam=1.0)):
            out = model(**batch).logits
    assert (out - ref)[valid].abs().max().item() < 1e-5
