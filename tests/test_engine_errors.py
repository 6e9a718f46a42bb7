"""Invalid input fails early with a message naming the bad value (issue test 8)."""

from __future__ import annotations

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.schedule import DropSchedule
from tests.helpers import make_batch, tiny_model


@pytest.mark.parametrize("ratio", [1.5, -0.1, float("nan")])
def test_ratio_outside_unit_interval(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"ratio=.*outside the allowed range \[0, 1\]"):
        DropSchedule.drop(layer=2, ratio=ratio)


def test_fastv_and_pdrop_parameters_checked() -> None:
    with pytest.raises(ValueError, match=r"R=1.2"):
        DropSchedule.fastv(K=2, R=1.2)
    with pytest.raises(ValueError, match=r"lam=2"):
        DropSchedule.pdrop(lam=2)


@pytest.mark.parametrize("layer", [0, 4, 40])
def test_boundary_outside_model(layer: int) -> None:
    model = tiny_model("llava", "llama", "sdpa")
    expected = r"\[1, L-1\]" if layer < 1 else r"\[1, 3\] for a language model with 4 layers"
    with pytest.raises(ValueError, match=rf"boundary {layer} is outside the allowed range {expected}"):
        with apply_schedule(model, DropSchedule(method="drop", boundaries=(layer,), ratios=(0.5,))):
            pytest.fail("the schedule was applied")


def test_non_increasing_boundaries() -> None:
    with pytest.raises(ValueError, match=r"strictly increasing, got \[16, 8\]"):
        DropSchedule.pdrop(layers=(16, 8), lam=0.5)
    with pytest.raises(ValueError, match=r"strictly increasing, got \[8, 8\]"):
        DropSchedule.pdrop(layers=(8, 8), lam=0.5)


def test_ratios_must_not_grow() -> None:
    with pytest.raises(ValueError, match=r"must not increase.*\[0.2, 0.5\]"):
        DropSchedule.pdrop(layers=(1, 2), ratios=(0.2, 0.5))


def test_unknown_names() -> None:
    with pytest.raises(ValueError, match="ranker='attn'"):
        DropSchedule.drop(layer=2, ratio=0.5, ranker="attn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positions='renumber'"):
        DropSchedule.drop(layer=2, ratio=0.5, positions="renumber")  # type: ignore[arg-type]


def test_language_model_embeds_without_image_positions() -> None:
    """Embeddings handed straight to the language model carry no image placeholders (the
    image features are already merged); the engine says where to pass them instead."""
    model = tiny_model("llava", "llama", "sdpa")
    batch = make_batch(model, [(2, 3)])
    embeds = model.model.language_model.embed_tokens(batch["input_ids"])
    with apply_schedule(model, DropSchedule.drop(layer=2, ratio=0.5)), torch.no_grad():
        with pytest.raises(ValueError, match="cannot find the image tokens.*multimodal model"):
            model.model.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"])


def test_engine_refuses_unsupported_attention() -> None:
    model = tiny_model("llava", "llama", "sdpa")
    cfg = model.config.text_config
    cfg._attn_implementation_internal = "flex_attention"
    try:
        with pytest.raises(ValueError, match="attn_implementation='flex_attention' is not supported"):
            with apply_schedule(model, DropSchedule.drop(layer=2, ratio=0.5)):
                pytest.fail("the schedule was applied")
    finally:
        cfg._attn_implementation_internal = "sdpa"
