"""The shipped micro-LLaVA checkpoints load offline and answer held-out questions."""

from __future__ import annotations

import json

import pytest
import torch

from redundancy.data import load_dataset, score
from redundancy.evaluate import predict
from redundancy.loading import SHIPPED, TEST_SET, load_model

NAMES = ["micro-llava-vanilla", "micro-llava-pdrop"]


@pytest.mark.parametrize("name", NAMES)
def test_shipped_checkpoint_answers_held_out_questions(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (SHIPPED / name).is_dir():
        pytest.skip(f"{name} is not shipped yet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for f in (SHIPPED / name).iterdir():
        assert f.suffix not in (".bin", ".pt", ".pkl"), f"{f.name}: weights must be safetensors"
        assert f.stat().st_size < 25 * 2**20, f"{f.name} exceeds 25 MiB"
    model, processor = load_model(name)
    assert model.config.text_config.num_hidden_layers == 32
    samples = load_dataset(TEST_SET)[:64]
    with torch.no_grad():
        preds = predict(model, processor, samples, batch_size=32, progress=False)
    accuracy = sum(score(p, s.answers, "exact") for p, s in zip(preds, samples)) / len(samples)
    card = json.loads((SHIPPED / name / "card.json").read_text())
    # The card's accuracy was measured on the whole test set; 64 questions agree with it roughly.
    assert abs(accuracy - card["test_accuracy"]["accuracy"]) < 0.15
    # Guessing scores about 0.17 over the four families (1/8, 1/25, ~0.35, 1/6); the shipped
    # models are well above that, and colour questions (the asked object's colour among up to
    # six objects, 1/8 by guessing) are solved: 97.5-99.4% on the whole test set (cards).
    assert accuracy > 0.35
    color = [score(p, s.answers, "exact") for p, s in zip(preds, samples) if s.family == "color"]
    assert len(color) >= 8 and sum(color) / len(color) > 0.85


def test_card_says_what_the_run_trained_and_when_it_misses_the_target() -> None:
    from redundancy.micro.export import card_markdown

    card = {"name": "m", "command": "c", "seed": 0, "package_version": "0", "git_revision": "abc",
            "weights": "w", "size_bytes": 2**20, "final_loss": {"final": 0.5}, "train_device": "cpu",
            "train_threads": 2, "test_set": "t", "training_wall_s": {"a": 60.0, "final": 120.0},
            "train_config": {"init_from": "run/stage-a", "start_stage": "final"},
            "test_accuracy": {"accuracy": 0.6, "n": 10, "per_family": {"color": 0.6}}}
    weak = card_markdown(card)
    assert "## Limitations" in weak and "the stages before `final`" in weak and "`run/stage-a`" in weak
    card["test_accuracy"]["accuracy"] = 0.95
    card["train_config"] = {}
    strong = card_markdown(card)
    assert "Limitations" not in strong and "stages before" not in strong
    assert "- method: vanilla" in strong
    # A PyramidDrop run says where it dropped and with which position policy (compact unless set).
    card["train_config"] = {"method": "pdrop", "pdrop_layers": [8, 16, 24], "lam": 0.5,
                            "stages": [{"name": "a", "drop": False}, {"name": "final", "drop": True}]}
    expected = "PyramidDrop in the `final` stage(s): layers [8, 16, 24], lambda 0.5, positions compact"
    assert expected in card_markdown(card)
    card["test_accuracy"]["accuracy"] = 0.88  # below 90%: the twin's own target is named
    assert "within 3 points of its vanilla model" in card_markdown(card)
    card["test_accuracy"]["accuracy"] = 0.95
    card["train_config"]["pdrop_positions"] = "keep"
    assert "positions keep" in card_markdown(card)


def test_card_carries_the_layer_health_and_names_inert_layers() -> None:
    from redundancy.micro.export import card_markdown

    rows = [{"layer": i, "update": 0.5, "kl": kl, "changed": ch, "entropy": 0.9}
            for i, (kl, ch) in enumerate([(2.0, 0.5), (1e-5, 0.0), (0.01, 0.0), (1e-5, 0.01)])]
    card = {"name": "m", "command": "c", "seed": 0, "package_version": "0", "git_revision": "abc",
            "weights": "w", "size_bytes": 2**20, "final_loss": {}, "train_device": "cpu", "train_threads": 2,
            "test_set": "t", "training_wall_s": {"a": 60.0, "deep": 180.0},
            "train_config": {"stages": [{"name": "a", "layers": 4}, {"name": "deep", "layers": 32}]},
            "test_accuracy": {"accuracy": 0.95, "n": 10, "per_family": {"color": 0.95}},
            "layer_health": {"n": 10, "inert_kl": 1e-3, "inert": [1], "layers": rows}}
    text = card_markdown(card)
    assert "## Layer health" in text and "| 1 | 0.5 | 1e-05 | 0.0 | 0.900 | yes |" in text
    assert "| 3 | 0.5 | 1e-05 | 1.0 | 0.900 |  |" in text  # an answer changed: not inert
    assert "Layers [1] are inert" in text and "## Limitations" in text
    assert "3.0 of 4.0 minutes recorded here (75%)" in text
    card["layer_health"]["inert"] = []
    assert "Limitations" not in card_markdown(card)


@pytest.mark.parametrize("name", NAMES)
def test_shipped_checkpoint_has_no_inert_layer(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The card's layer health was measured on these weights and finds no inert layer; recomputed
    on a few questions, every layer still does work of the size the card records."""
    from redundancy.health import HEALTH_N, layer_health
    from redundancy.results import checkpoint_fingerprint

    if not (SHIPPED / name).is_dir():
        pytest.skip(f"{name} is not shipped yet")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    health = json.loads((SHIPPED / name / "card.json").read_text())["layer_health"]
    assert health["fingerprint"] == checkpoint_fingerprint(SHIPPED / name)
    assert health["n"] == HEALTH_N and len(health["layers"]) == 32
    assert health["inert"] == [], f"inert layers {health['inert']}"
    model, processor = load_model(name, attn_implementation="eager")
    table = layer_health(model, processor, load_dataset(TEST_SET)[:16], progress=False)
    for row, recorded in zip(table, health["layers"]):
        assert row.layer == recorded["layer"]
        assert 0.5 < row.update / recorded["update"] < 2, row  # the residual update hardly depends on the question
        assert row.kl > 1e-5, row  # skipping any layer moves the answer's distribution
        assert row.entropy < 0.95, row  # no layer attends uniformly over the image


@pytest.mark.parametrize("name", NAMES)
def test_shipped_card_names_no_machine_path(name: str) -> None:
    from pathlib import Path

    if not (SHIPPED / name).is_dir():
        pytest.skip(f"{name} is not shipped yet")
    card = json.loads((SHIPPED / name / "card.json").read_text())
    for key in ("out", "init_from"):
        value = card["train_config"].get(key)
        assert value is None or not Path(value).is_absolute(), f"{key}={value}"
    assert str(Path.cwd()) not in (SHIPPED / name / "README.md").read_text()
