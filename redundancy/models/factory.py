"""Random-initialised models of the real HF classes, for tests and timing.

    model = build_model(tiny_config("llava", text="mistral"))

No weights are downloaded: every model here is built from a config.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    PreTrainedConfig,
    PreTrainedModel,
)

from redundancy.presets import ModelDims

Family = Literal["llava", "llava_next"]
TextBackbone = Literal["llama", "mistral", "qwen2"]

_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
}


def tiny_config(
    family: Family = "llava",
    *,
    text: TextBackbone = "llama",
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    vocab: int = 128,
    image_size: int = 28,
    patch_size: int = 7,
    **overrides: Any,
) -> PreTrainedConfig:
    """A tiny LLaVA(-NeXT) config: CLIP vision tower + Llama/Mistral/Qwen2 decoder.

    The image token is the last vocabulary id; ``(image_size / patch_size)**2``
    image tokens per image (16 by default) for LLaVA.
    """
    side = image_size // patch_size
    dims = ModelDims(
        name="tiny", num_layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, vocab=vocab,
        n_image=side * side, n_text=16, vision_layers=2, vision_hidden=32, vision_ffn=64, vision_heads=2,
        vision_tokens=side * side + 1, vision_patch=patch_size, vision_crops=1, projector_in=32, projector_hidden=hidden,
    )
    return config_from_dims(dims, family, text=text, **overrides)


def config_from_dims(
    dims: ModelDims, family: Family = "llava", *, text: TextBackbone = "llama", **overrides: Any
) -> PreTrainedConfig:
    """A LLaVA(-NeXT) config with the shapes of ``dims`` (e.g. a published 7B preset):
    CLIP vision tower, Llama / Mistral / Qwen2 decoder, ``dims.vision_patches`` image tokens
    per crop. ``overrides`` go to the LLaVA config (default image token: the last vocabulary id)."""
    text_cfg = AutoConfig.for_model(
        text,
        hidden_size=dims.hidden,
        intermediate_size=dims.ffn,
        num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        vocab_size=dims.vocab,
        max_position_embeddings=max(4096, 2 * (dims.n_image + dims.n_text)),
        pad_token_id=0,
        tie_word_embeddings=False,
        **({"sliding_window": None} if text == "mistral" else {}),
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=dims.vision_hidden,
        intermediate_size=dims.vision_ffn,
        num_hidden_layers=dims.vision_layers,
        num_attention_heads=dims.vision_heads,
        image_size=dims.image_size,
        patch_size=dims.vision_patch,
        projection_dim=dims.vision_hidden,
    )
    common: dict[str, Any] = dict(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=dims.vocab - 1,
        image_seq_length=dims.vision_patches,
    )
    common.update(overrides)
    if family == "llava":
        return LlavaConfig(**common)
    s = dims.image_size
    return LlavaNextConfig(**common, image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]])


def build_model(
    config: PreTrainedConfig,
    *,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PreTrainedModel:
    """Random-initialised model of ``config`` (seeded), in eval mode."""
    cls = _CLASSES[config.model_type]
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    return model.eval()
