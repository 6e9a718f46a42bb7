"""Model presets and reading sizes from transformers configs."""

from __future__ import annotations

import pytest
from transformers import LlavaConfig, LlavaNextConfig

from redundancy.presets import PRESETS, ModelDims, get_preset


def test_llava15_preset_matches_the_published_sizes() -> None:
    dims = get_preset("llava-1.5-7b")
    assert (dims.num_layers, dims.hidden, dims.ffn, dims.heads, dims.kv_heads) == (32, 4096, 11008, 32, 32)
    assert (dims.vocab, dims.n_image, dims.vision_crops) == (32064, 576, 1)
    assert (dims.vision_layers, dims.vision_hidden, dims.vision_ffn, dims.vision_tokens) == (24, 1024, 4096, 577)
    assert dims.vision_patches == 576 and dims.image_size == 336 and dims.head_dim == 128


def test_llava_next_preset_shares_the_lm_and_has_five_crops() -> None:
    base, nxt = get_preset("llava-1.5-7b"), get_preset("llava-next-7b")
    assert (nxt.num_layers, nxt.hidden, nxt.ffn) == (base.num_layers, base.hidden, base.ffn)
    assert nxt.n_image == 2880 == nxt.vision_crops * nxt.vision_patches


def test_unknown_preset_lists_the_known_names() -> None:
    with pytest.raises(ValueError, match="llava-7b-typo") as err:
        get_preset("llava-7b-typo")
    for name in PRESETS:
        assert name in str(err.value)


def test_inconsistent_sizes_are_rejected() -> None:
    good = get_preset("llava-1.5-7b")
    with pytest.raises(ValueError, match="kv_heads"):
        ModelDims(**{**good.__dict__, "kv_heads": 5})
    with pytest.raises(ValueError, match="vision_tokens"):
        ModelDims(**{**good.__dict__, "vision_tokens": 576})


def _tiny_text() -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": 4,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 1000,
    }


def _tiny_vision() -> dict:
    return {
        "model_type": "clip_vision_model",
        "num_hidden_layers": 3,
        "hidden_size": 32,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "image_size": 56,
        "patch_size": 14,
    }


def test_from_hf_config_reads_a_tiny_llava_config() -> None:
    config = LlavaConfig(text_config=_tiny_text(), vision_config=_tiny_vision())
    dims = ModelDims.from_hf_config(config, n_image=16, n_text=10, name="tiny")
    assert (dims.name, dims.num_layers, dims.hidden, dims.ffn) == ("tiny", 4, 64, 160)
    assert (dims.heads, dims.kv_heads, dims.kv_dim, dims.vocab) == (8, 2, 16, 1000)
    assert (dims.n_image, dims.n_text) == (16, 10)
    assert (dims.vision_layers, dims.vision_hidden, dims.vision_ffn, dims.vision_heads) == (3, 32, 96, 4)
    # 56 px / 14 px patches = 4 x 4 patches + CLS
    assert (dims.vision_tokens, dims.vision_patch, dims.vision_crops) == (17, 14, 1)
    assert (dims.projector_in, dims.projector_hidden) == (32, 64)


def test_from_hf_config_counts_llava_next_crops_from_the_pinpoints() -> None:
    # The largest grid, 112 x 112 on 56 px crops, is 2 x 2 crops: + the base image = 5.
    config = LlavaNextConfig(
        text_config=_tiny_text(), vision_config=_tiny_vision(), image_grid_pinpoints=[[56, 112], [112, 112]]
    )
    assert ModelDims.from_hf_config(config, n_image=80, n_text=10).vision_crops == 5
    assert ModelDims.from_hf_config(config, n_image=80, n_text=10, vision_crops=3).vision_crops == 3
