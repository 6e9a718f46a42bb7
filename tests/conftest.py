"""Shared builders for the engine tests: tiny random models of the real HF classes
and prompt batches with image tokens, left-padded like generation batches."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import pytest
import torch
from transformers import DynamicCache
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from redundancy.engine import apply_schedule
from redundancy.models.factory import build_model, tiny_config
from redundancy.models.llava_next import next_image_layout
from redundancy.schedule import DropSchedule


@pytest.fixture(autouse=True, scope="session")
def single_thread() -> Any:
    """Tiny matrices gain nothing from intra-op threads, and OpenMP threads that
    spin against other processes on a small CPU slow every op ~100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@lru_cache(maxsize=32)
def tiny_model(
    family: str = "llava", text: str = "llama", attn: str = "sdpa", dtype: torch.dtype = torch.float32, layers: int = 4
) -> Any:
    """Cached tiny model (do not mutate it in tests)."""
    return build_model(tiny_config(family, text=text, layers=layers), attn_implementation=attn, dtype=dtype)


def n_image_tokens(model: Any, image_hw: tuple[int, int] | None = None) -> int:
    cfg = model.config
    if cfg.model_type == "llava":
        return (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    assert image_hw is not None
    base, high = next_image_layout(
        *image_hw, cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.image_grid_pinpoints
    )
    return base[0] * base[1] + high[0] * high[1]


def make_batch(
    model: Any,
    specs: list[tuple[int, int]],
    image_hw: list[tuple[int, int]] | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """One prompt per spec ``(text before image, text after image)``, left-padded.

    LLaVA-NeXT rows take their image size from ``image_hw`` (so image-token counts
    differ per row).
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    vocab = cfg.text_config.vocab_size
    img = cfg.image_token_id
    rows = []
    for i, (pre, post) in enumerate(specs):
        n = n_image_tokens(model, image_hw[i] if image_hw else None)
        text = torch.randint(1, vocab - 1, (pre + post,), generator=gen)
        rows.append(torch.cat([text[:pre], torch.full((n,), img), text[pre:]]))
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r) :] = r
        mask[i, length - len(r) :] = 1
    dtype = next(model.parameters()).dtype
    size = cfg.vision_config.image_size
    out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask}
    if cfg.model_type == "llava":
        out["pixel_values"] = torch.randn(len(rows), 3, size, size, generator=gen).to(dtype)
    else:
        assert image_hw is not None
        patches = max(image_size_to_num_patches(hw, cfg.image_grid_pinpoints, size) for hw in image_hw)
        out["pixel_values"] = torch.randn(len(rows), patches, 3, size, size, generator=gen).to(dtype)
        out["image_sizes"] = torch.tensor(image_hw)
    return out


def select_rows(batch: dict[str, torch.Tensor], row: int) -> dict[str, torch.Tensor]:
    """Row ``row`` of a batch, with its left padding removed."""
    keep = batch["attention_mask"][row].bool()
    out = {"input_ids": batch["input_ids"][row : row + 1, keep], "attention_mask": batch["attention_mask"][row : row + 1, keep]}
    out["pixel_values"] = batch["pixel_values"][row : row + 1]
    if "image_sizes" in batch:
        out["image_sizes"] = batch["image_sizes"][row : row + 1]
    return out


def engine_generate(
    model: Any, schedule: DropSchedule, steps: int, **inputs: Any
) -> tuple[torch.Tensor, torch.Tensor, Any, DynamicCache]:
    """Greedy generation of ``steps`` tokens under the engine with our own cache. Returns
    the new tokens ``[batch, steps]``, the next-token logits of every step as the model
    computed them ``[steps, batch, vocab]`` (``generate``'s own ``output_logits`` are cast
    to float32), the trace and the cache."""
    cache = DynamicCache()
    seen: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out[:, -1].detach().clone()))
    try:
        with torch.no_grad(), apply_schedule(model, schedule) as trace:
            out = model.generate(
                **inputs,
                past_key_values=cache,
                max_new_tokens=steps,
                do_sample=False,
                eos_token_id=None,  # always `steps` tokens
                pad_token_id=0,
                suppress_tokens=[int(model.config.image_token_id)],  # a generated "image token" is no image
                return_dict_in_generate=True,
            )
    finally:
        hook.remove()
    width = inputs["input_ids"].shape[1]
    assert trace.prefills == 1
    assert len(seen) == steps
    assert out.sequences.shape == (inputs["input_ids"].shape[0], width + steps)
    return out.sequences[:, width:], torch.stack(seen), trace, cache
