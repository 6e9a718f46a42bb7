"""What several test modules share: tiny random models of the real HF classes and prompt batches
(left-padded like generation batches), engine generation with our own cache, a tiny saved micro-LLaVA
and sweep configs on it. Fixtures and pytest hooks stay in conftest.py."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from transformers import DynamicCache
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from redundancy import sweep
from redundancy.cli import CONF
from redundancy.engine import apply_schedule
from redundancy.micro.model import MicroConfig, build_micro
from redundancy.micro.train import vocabulary
from redundancy.models.factory import build_model, tiny_config
from redundancy.models.llava_next import next_image_layout
from redundancy.schedule import DropSchedule

ROOT = Path(__file__).resolve().parents[1]


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
    out = {
        "input_ids": batch["input_ids"][row : row + 1, keep],
        "attention_mask": batch["attention_mask"][row : row + 1, keep],
    }
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


# ------------------------------------------------------------- a saved tiny micro-LLaVA
LAYERS = 6


def save_tiny_micro(path: Path, layers: int = LAYERS, seed: int = 0) -> Path:
    """A tiny micro-LLaVA (32 px images, 16 image tokens) saved as an HF directory. The
    residual outputs that build_micro zero-initialises get random weights, so that every
    layer changes the hidden states and dropping tokens changes the logits."""
    shape = MicroConfig(layers=layers, hidden=32, heads=4, kv_heads=2, ffn=64, image_size=32, patch=8,
                        vision_layers=1, vision_hidden=32, vision_heads=2, vision_ffn=64)
    model, processor = build_micro(shape, vocabulary(MicroConfig()), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight):
                w.copy_(torch.randn(w.shape, generator=gen) * 0.3)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


# ------------------------------------------------------------- sweep configs
def sweep_config(*overrides: str) -> sweep.SweepConfig:
    with initialize_config_dir(config_dir=str(CONF / "sweep"), version_base=None):
        cfg = compose(config_name="sweep", overrides=list(overrides))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


def tiny(tiny_dir: Path, out: Path, *overrides: str) -> sweep.SweepConfig:
    """A sweep on the tiny model over 6 shipped test questions, no timing, no progress bars."""
    return sweep_config(f"model.path={tiny_dir}", "model.num_layers=null", "data.limit=6", "batch_size=4",
                  f"out={out}", "timing.repeats=0", "progress=false", *overrides)
