"""Random-initialised models of the real HF classes, for tests and timing.

    model = build_model(tiny_config("llava", text="mistral"))
    model = build_model(tiny_config("qwen2_vl"))    # Qwen2-VL (its own Qwen2 decoder)

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
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from redundancy.presets import ModelDims

QwenVLFamily = Literal["qwen2_vl", "qwen2_5_vl"]
Family = Literal["llava", "llava_next", QwenVLFamily]
QWEN_VL_FAMILIES: tuple[QwenVLFamily, ...] = ("qwen2_vl", "qwen2_5_vl")
TextBackbone = Literal["llama", "mistral", "qwen2"]

_CLASSES: dict[str, type[PreTrainedModel]] = {
    "llava": LlavaForConditionalGeneration,
    "llava_next": LlavaNextForConditionalGeneration,
    "qwen2_vl": Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration,
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
    image tokens per image (16 by default) for LLaVA. Qwen2-VL / Qwen2.5-VL: see
    :func:`tiny_qwen_vl_config` (``text`` and ``image_size`` do not apply).
    """
    if family in QWEN_VL_FAMILIES:
        return tiny_qwen_vl_config(
            family, layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, ffn=ffn, vocab=vocab,
            patch_size=patch_size, **overrides,
        )
    side = image_size // patch_size
    dims = ModelDims(
        name="tiny", num_layers=layers, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, vocab=vocab,
        n_image=side * side, n_text=16, vision_layers=2, vision_hidden=32, vision_ffn=64, vision_heads=2,
        vision_tokens=side * side + 1, vision_patch=patch_size, vision_crops=1, projector_in=32,
        projector_hidden=hidden,
    )
    return config_from_dims(dims, family, text=text, **overrides)


def config_from_dims(
    dims: ModelDims, family: Family = "llava", *, text: TextBackbone = "llama", **overrides: Any
) -> PreTrainedConfig:
    """A LLaVA(-NeXT) config with the shapes of ``dims`` (e.g. a published 7B preset):
    CLIP vision tower, Llama / Mistral / Qwen2 decoder, ``dims.vision_patches`` image tokens
    per crop. ``overrides`` go to the LLaVA config (default image token: the last vocabulary id)."""
    if family not in ("llava", "llava_next"):
        raise ValueError(f"config_from_dims builds LLaVA(-NeXT) configs, not {family!r}; use tiny_config")
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


def tiny_qwen_vl_config(
    family: QwenVLFamily = "qwen2_vl",
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
    vocab: int = 128,
    patch_size: int = 7,
    **overrides: Any,
) -> PreTrainedConfig:
    """A tiny Qwen2-VL / Qwen2.5-VL config: a 2-layer ViT (width 32, 2x2 patch merger;
    2.5: window attention in block 0) and a Qwen2 decoder with multimodal rotary.

    Token ids from the top of the vocabulary: image ``vocab - 1``, video ``vocab - 2``,
    ``<|vision_start|>`` ``vocab - 3``, ``<|vision_end|>`` ``vocab - 4``; pad 0, bos 1,
    eos 2. An image of ``(1, h, w)`` patches (``h``, ``w`` even; ``patch_size`` pixels
    each) gives ``h * w / 4`` image tokens. The rotary sections split ``head_dim / 2``
    like the released models (16/24/24 of 64).
    """
    half = hidden // heads // 2
    temporal = half // 4
    section = [temporal, (half - temporal) // 2, half - temporal - (half - temporal) // 2]
    text = {
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
    }
    vision: dict[str, Any] = {
        "depth": 2, "num_heads": 2, "patch_size": patch_size, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "in_channels": 3,
    }
    ids: dict[str, Any] = {
        "image_token_id": vocab - 1, "video_token_id": vocab - 2,
        "vision_start_token_id": vocab - 3, "vision_end_token_id": vocab - 4,
    }
    if family == "qwen2_vl":
        vision.update(embed_dim=32, hidden_size=hidden, mlp_ratio=2)
        return Qwen2VLConfig(text_config=text, vision_config=vision, **ids, **overrides)
    # Window attention (block 0) over windows of 2 x 2 merged cells; block 1 attends globally.
    vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=hidden, window_size=4 * patch_size,
                  fullatt_block_indexes=[1])
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids, **overrides)


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
