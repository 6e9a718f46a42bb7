"""Layer health (redundancy.health) finds the inert layers of an identity-grown model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from redundancy.data import load_dataset
from redundancy.health import INERT_KL, LayerHealth, inert_layers, layer_health, markdown, skipped
from redundancy.micro.microvqa import GenConfig, write_split
from redundancy.micro.model import MicroConfig, build_micro, build_model, grow
from redundancy.micro.train import vocabulary

SHAPE = MicroConfig(layers=2, hidden=32, heads=2, kv_heads=2, ffn=64, image_size=48, patch=8,
                    vision_layers=1, vision_hidden=32, vision_heads=2, vision_ffn=64)


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    shallow, processor = build_micro(SHAPE, vocabulary(SHAPE), seed=1)
    torch.manual_seed(0)
    for p in shallow.parameters():  # every shallow layer does something
        torch.nn.init.normal_(p, std=0.2)
    deep = grow(shallow, build_model(dataclasses.replace(SHAPE, layers=4), processor.tokenizer, seed=2))
    deep.set_attn_implementation("eager")
    data = write_split(GenConfig(), "test", 6, tmp_path_factory.mktemp("data"), progress=False)
    return deep, processor, load_dataset(data)


def test_identity_growth_leaves_the_inserted_layers_inert(grown: tuple) -> None:
    model, processor, samples = grown
    table = layer_health(model, processor, samples, batch_size=4, progress=False)
    assert [r.layer for r in table] == [0, 1, 2, 3]
    # identity growth of 2 layers into 4: layers 0 and 2 are the trained ones, 1 and 3 the identity
    assert inert_layers(table) == [1, 3]
    for r in table:
        if r.layer in (1, 3):
            assert r.update < 1e-6 and r.kl < 1e-9 and r.changed == 0
        else:
            assert r.update > 1e-2 and r.kl > INERT_KL
        assert 0 < r.entropy <= 1 + 1e-6
    assert "Inert (no answer changed and KL < 0.001): [1, 3]" in markdown(table, len(samples))


def test_skipping_a_layer_returns_its_input(grown: tuple) -> None:
    model, _, _ = grown
    layer = model.model.language_model.layers[0]
    h = torch.randn(1, 3, 32)
    cos, sin = model.model.language_model.rotary_emb(h, torch.arange(3)[None])
    with torch.no_grad():
        assert not torch.allclose(layer(h, attention_mask=None, position_embeddings=(cos, sin)), h)
        with skipped(model, 0):
            torch.testing.assert_close(layer(h, attention_mask=None, position_embeddings=(cos, sin)), h)
        assert not torch.allclose(layer(h, attention_mask=None, position_embeddings=(cos, sin)), h)  # hook removed


def test_a_layer_is_inert_only_when_no_answer_changes_and_the_kl_is_small() -> None:
    assert LayerHealth(0, 0.1, INERT_KL / 2, 0.0, 1.0).inert
    assert not LayerHealth(0, 0.1, INERT_KL / 2, 1 / 600, 1.0).inert
    assert not LayerHealth(0, 0.1, INERT_KL * 2, 0.0, 1.0).inert


def test_health_command_writes_the_table(tmp_path: Path, grown: tuple) -> None:
    model, processor, _ = grown
    model.save_pretrained(tmp_path / "m")
    processor.save_pretrained(tmp_path / "m")
    from redundancy.health import HealthConfig, run

    data = write_split(GenConfig(), "test", 4, tmp_path / "data", progress=False)
    text = run(HealthConfig(model=str(tmp_path / "m"), data=str(data), n=4, out=str(tmp_path / "out"), device="cpu"))
    assert "| 1 |" in text and "[1, 3]" in text
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"m.json", "m.md", "m.png"}
