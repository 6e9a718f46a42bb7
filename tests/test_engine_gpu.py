"""The engine on CUDA in bf16 with SDPA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.models.factory import build_model, tiny_config
from redundancy.schedule import DropSchedule
from tests.helpers import make_batch, select_rows

pytestmark = pytest.mark.gpu


def _model(family: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    return build_model(tiny_config(family, text="mistral"), attn_implementation="sdpa", dtype=dtype).cuda()


def _cuda(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.cuda() for k, v in batch.items()}


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_keep_all_matches_bf16(family: str) -> None:
    model = _model(family)
    sizes = [(28, 56), (56, 56)] if family == "llava_next" else None
    batch = _cuda(make_batch(model, [(3, 5), (1, 3)], image_hw=sizes))
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**batch).logits.float()
        ref_gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
        with apply_schedule(model, DropSchedule.pdrop(layers=(1, 2, 3), lam=1.0)):
            out = model(**batch).logits.float()
            gen = model.generate(**batch, max_new_tokens=5, do_sample=False)
    assert (out - ref)[valid].abs().max().item() < 2e-2
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_batched_equals_single_float32_cuda(family: str) -> None:
    model = _model(family, torch.float32)
    sizes = [(28, 56), (56, 56)] if family == "llava_next" else None
    batch = _cuda(make_batch(model, [(3, 6), (1, 4)], image_hw=sizes, seed=1))
    with torch.no_grad(), apply_schedule(model, DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5)) as trace:
        gen = model.generate(**batch, max_new_tokens=6, do_sample=False)
        kept = [b.kept for b in trace.boundaries]
        for row in range(2):
            single = select_rows(batch, row)
            gen1 = model.generate(**single, max_new_tokens=6, do_sample=False)
            assert torch.equal(gen1[0, single["input_ids"].shape[1] :], gen[row, batch["input_ids"].shape[1] :])
            for b, record in enumerate(trace.boundaries):
                assert torch.equal(record.kept[0], kept[b][row])


def test_training_step_bf16() -> None:
    model = _model("llava").train()
    batch = _cuda(make_batch(model, [(3, 6), (1, 4)]))
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100
    with apply_schedule(model, DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5)):
        loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.model.multi_modal_projector.parameters())


def test_flash_attention_matches_sdpa() -> None:
    pytest.importorskip("flash_attn")
    sdpa = _model("llava")
    flash = build_model(tiny_config("llava", text="mistral"), attn_implementation="flash_attention_2",
                        dtype=torch.bfloat16).cuda()
    batch = _cuda(make_batch(sdpa, [(3, 5), (1, 3)]))
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5)
    with torch.no_grad():
        with apply_schedule(sdpa, schedule) as t1:
            g1 = sdpa.generate(**batch, max_new_tokens=5, do_sample=False)
        with apply_schedule(flash, schedule) as t2:
            g2 = flash.generate(**batch, max_new_tokens=5, do_sample=False)
    assert t1.kept_counts() == t2.kept_counts()
    assert (g1 == g2).float().mean() > 0.8  # bf16 kernels differ; most tokens agree
