"""Model dimensions for FLOPs accounting and for building random-initialised models.

    from redundancy.presets import get_preset, ModelDims
    dims = get_preset("llava-1.5-7b")
    dims = ModelDims.from_hf_config(model.config, n_image=576, n_text=64)

A :class:`ModelDims` holds only sizes (no weights, no HF objects), so the FLOPs
arithmetic in :mod:`redundancy.flops` stays pure. Sources of the preset numbers:
the HF configs of ``llava-hf/llava-1.5-7b-hf`` and ``llava-hf/llava-v1.6-vicuna-7b-hf``
(Vicuna-7B LM: 32 layers, d=4096, m=11008, 32 heads, vocab 32064) with the
CLIP ViT-L/14-336 vision tower (24 layers, 1024 hidden, 4096 FFN, 16 heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

# Assumed length of the text part of a prompt (system prompt + question +
# "ASSISTANT:") for the LLaVA-1.5 VQA template. Used ONLY for full-sequence
# FLOPs and the ranking key length; the paper's image-part figures ignore it.
DEFAULT_N_TEXT = 64


@dataclass(frozen=True)
class ModelDims:
    """Sizes of a LLaVA-style model: vision encoder -> 2-layer MLP projector -> LM.

    Language model: ``num_layers`` (L) decoder layers of width ``hidden`` (d),
    gated FFN width ``ffn`` (m), ``heads`` query heads and ``kv_heads`` key/value
    heads (grouped-query attention when fewer), vocabulary ``vocab``.

    Prompt: ``n_image`` image tokens per sample (576 for LLaVA-1.5; at most 2880
    for LLaVA-NeXT with four crops, the count varies per image) and ``n_text``
    text tokens, an assumption used only for full-sequence FLOPs.

    Vision tower (CLIP ViT): ``vision_layers`` layers of width ``vision_hidden``,
    FFN ``vision_ffn``, ``vision_heads`` heads, ``vision_tokens`` tokens per crop
    including CLS (577 for ViT-L/14 at 336 px), patch size ``vision_patch``, and
    ``vision_crops`` crops per image (1 for LLaVA-1.5, base + 4 = 5 for NeXT).

    Projector: ``Linear(projector_in, projector_hidden) -> GELU -> Linear(projector_hidden, hidden)``.
    """

    name: str
    num_layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    n_image: int
    n_text: int
    vision_layers: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    vision_tokens: int
    vision_patch: int
    vision_crops: int
    projector_in: int
    projector_hidden: int

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "name":
                continue
            # n_image / n_text may be 0 (a text-only prompt); every size must be positive.
            low = 0 if f.name in ("n_image", "n_text") else 1
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{f.name}={value!r} must be an integer >= {low}")
        if self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")
        side = math.isqrt(self.vision_tokens - 1)
        if side * side != self.vision_tokens - 1:
            raise ValueError(f"vision_tokens={self.vision_tokens} is not a square patch grid + 1 CLS token")

    # ----------------------------------------------------------- derived sizes
    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        """Width of the key (or value) projection output: ``kv_heads * head_dim``."""
        return self.kv_heads * self.head_dim

    @property
    def vision_patches(self) -> int:
        """Patch tokens per crop (CLS excluded): 576 for ViT-L/14 at 336 px."""
        return self.vision_tokens - 1

    @property
    def image_size(self) -> int:
        """Side of one crop in pixels."""
        return math.isqrt(self.vision_patches) * self.vision_patch

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_hf_config(
        cls,
        config: Any,
        n_image: int,
        n_text: int = DEFAULT_N_TEXT,
        *,
        name: str | None = None,
        vision_crops: int | None = None,
    ) -> ModelDims:
        """Read the sizes of a transformers ``LlavaConfig`` / ``LlavaNextConfig``.

        ``vision_crops`` defaults to 1 for LLaVA and, for LLaVA-NeXT, to the base
        image plus the most crops any ``image_grid_pinpoints`` resolution needs
        (5 for the default grid), i.e. the worst case.
        """
        text, vision = config.text_config, config.vision_config
        kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        feature_layer = getattr(config, "vision_feature_layer", -2)
        # A list of feature layers is concatenated along the channel axis before the projector.
        n_feature_layers = len(feature_layer) if isinstance(feature_layer, (list, tuple)) else 1
        if vision_crops is None:
            vision_crops = _max_crops(config, vision.image_size)
        patches_per_side = vision.image_size // vision.patch_size
        return cls(
            name=name or getattr(config, "_name_or_path", "") or type(config).__name__,
            num_layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            ffn=text.intermediate_size,
            heads=text.num_attention_heads,
            kv_heads=kv_heads,
            vocab=text.vocab_size,
            n_image=n_image,
            n_text=n_text,
            vision_layers=vision.num_hidden_layers,
            vision_hidden=vision.hidden_size,
            vision_ffn=vision.intermediate_size,
            vision_heads=vision.num_attention_heads,
            vision_tokens=patches_per_side**2 + 1,
            vision_patch=vision.patch_size,
            vision_crops=vision_crops,
            projector_in=vision.hidden_size * n_feature_layers,
            projector_hidden=text.hidden_size,
        )


def _max_crops(config: Any, image_size: int) -> int:
    """1 for LLaVA; 1 base image + the largest any-res grid for LLaVA-NeXT."""
    pinpoints = getattr(config, "image_grid_pinpoints", None)
    if not pinpoints:
        return 1
    return 1 + max((h // image_size) * (w // image_size) for h, w in pinpoints)


def _vicuna7b_clip336(name: str, n_image: int, vision_crops: int) -> ModelDims:
    return ModelDims(
        name=name,
        num_layers=32,
        hidden=4096,
        ffn=11008,
        heads=32,
        kv_heads=32,
        vocab=32064,
        n_image=n_image,
        n_text=DEFAULT_N_TEXT,
        vision_layers=24,
        vision_hidden=1024,
        vision_ffn=4096,
        vision_heads=16,
        vision_tokens=577,
        vision_patch=14,
        vision_crops=vision_crops,
        projector_in=1024,
        projector_hidden=4096,
    )


PRESETS: dict[str, ModelDims] = {
    "llava-1.5-7b": _vicuna7b_clip336("llava-1.5-7b", n_image=576, vision_crops=1),
    # Worst case of the any-res grid: base image + 4 crops, 5 x 576 = 2880 tokens
    # (the paper's count; newline tokens and unpadding make real counts vary).
    "llava-next-7b": _vicuna7b_clip336("llava-next-7b", n_image=2880, vision_crops=5),
}


def get_preset(name: str) -> ModelDims:
    """The :class:`ModelDims` called ``name``; ValueError listing the known names otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"model={name!r} is not a known preset; choose one of {sorted(PRESETS)}") from None
