"""The dataset reader (local format and TextVQA), the VQA answer normaliser and the metrics."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from redundancy.data import (
    Sample,
    evaluate,
    exact_match,
    load_dataset,
    metric_for,
    normalize_answer,
    score,
    vqa_accuracy,
)

TEXTVQA = Path(__file__).resolve().parent / "fixtures" / "textvqa" / "textvqa_val.json"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),
        ("the Red", "red"),
        ("A dog!", "dog"),
        ("an apple", "apple"),
        ("Coca-Cola", "coca cola"),  # a glued hyphen becomes a space
        ("left - right", "left right"),  # a spaced one is deleted
        ("1,000", "1000"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("yes.", "yes"),
        ("dont", "don't"),
        ("  Ten\tdollars\n", "10 dollars"),
        ("none", "0"),
        ("what?", "what"),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match() -> None:
    assert exact_match("Red.", ["red"]) == 1.0
    assert exact_match("two", ["2"]) == 1.0
    assert exact_match("the 2", ["two"]) == 1.0
    assert exact_match("blue", ["red"]) == 0.0
    assert exact_match("red square", ["red"]) == 0.0
    assert exact_match("k", ["x", "k"]) == 1.0


@pytest.mark.parametrize(
    ("k", "expected"),
    # k of 10 humans agree. Leave-one-out: k subsets keep k-1 matches, 10-k keep k;
    # k=1: 9 * (1/3) / 10 = 0.3;  k=2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6;
    # k=3: (3 * 2/3 + 7 * 1) / 10 = 0.9;  k=4: every subset keeps >= 3 matches -> 1.
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_hand_computed(k: int, expected: float) -> None:
    answers = ["yes"] * k + ["no"] * (10 - k)
    assert vqa_accuracy("Yes.", answers) == pytest.approx(expected)


def _m4c_reference(prediction: str, answers: list[str]) -> float:
    """The TextVQA evaluator's loop, written out literally (llava/eval/m4c_evaluator.py)."""
    gt = list(enumerate(normalize_answer(a) for a in answers))
    pred = normalize_answer(prediction)
    accs = []
    for item in gt:
        others = [o for o in gt if o != item]
        accs.append(min(1.0, sum(o[1] == pred for o in others) / 3))
    return sum(accs) / len(accs)


def test_vqa_accuracy_matches_reference_loop() -> None:
    rng = random.Random(0)
    words = ["2", "two", "Two.", "3", "the cat", "cat", "dog"]
    for _ in range(200):
        answers = [rng.choice(words) for _ in range(10)]
        pred = rng.choice(words)
        assert vqa_accuracy(pred, answers) == pytest.approx(_m4c_reference(pred, answers))


def test_score_dispatch() -> None:
    answers = ["3"] * 3 + ["4"] * 7
    assert score("three", answers, "vqa") == pytest.approx(0.9)
    assert score("three", answers, "exact") == 1.0
    with pytest.raises(ValueError, match="metric"):
        score("3", answers, "f1")
    with pytest.raises(ValueError):
        vqa_accuracy("3", [])


def _write_local(root: Path, records: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "questions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return root


def test_load_local_format(tmp_path: Path) -> None:
    records = [
        {"question_id": "q0", "image": "images/0.png", "question": "What color?", "answers": ["red"],
         "family": "color", "objects": [{"shape": "circle"}]},
        {"question_id": "q1", "image": "images/1.png", "question": "What is written?", "answers": ["k"] * 10,
         "family": "reading"},
    ]  # fmt: skip
    root = _write_local(tmp_path / "set", records)
    samples = load_dataset(root)
    assert samples == load_dataset(root / "questions.jsonl")
    assert [s.question_id for s in samples] == ["q0", "q1"]
    assert samples[0].image_path == root / "images/0.png"
    assert samples[0].answers == ("red",)
    assert samples[0].family == "color"
    assert samples[0].meta == {"objects": [{"shape": "circle"}]}
    assert samples[1].meta == {}
    assert metric_for(samples[:1]) == "exact"
    assert metric_for(samples) == "vqa"  # ten references anywhere -> soft accuracy


def test_load_local_rejects_bad_files(tmp_path: Path) -> None:
    good = {"question_id": 1, "image": "a.png", "question": "q", "answers": ["a"], "family": "color"}
    with pytest.raises(ValueError, match="missing field 'family'"):
        load_dataset(_write_local(tmp_path / "a", [{k: v for k, v in good.items() if k != "family"}]))
    with pytest.raises(ValueError, match="not unique"):
        load_dataset(_write_local(tmp_path / "b", [good, good]))
    with pytest.raises(ValueError, match="list of strings"):
        load_dataset(_write_local(tmp_path / "c", [{**good, "answers": "a"}]))
    with pytest.raises(FileNotFoundError):
        load_dataset(tmp_path / "missing")
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="expected"):
        load_dataset(tmp_path / "x.csv")


def test_load_textvqa_fixture() -> None:
    samples = load_dataset(TEXTVQA)
    assert [s.question_id for s in samples] == [34602, 34603, 34604]
    assert all(len(s.answers) == 10 for s in samples)
    assert all(s.image_path.is_file() for s in samples)  # <json dir>/images/<image_id>.jpg
    assert samples[0].image_path.name == "00a1b2c3d4e5f601.jpg"
    assert [s.family for s in samples] == ["textvqa", "textvqa", "what number"]
    assert samples[0].meta["image_id"] == "00a1b2c3d4e5f601"
    assert metric_for(samples) == "vqa"
    assert load_dataset(TEXTVQA, image_dir="/elsewhere")[0].image_path == Path("/elsewhere/00a1b2c3d4e5f601.jpg")


def test_textvqa_fixture_scores() -> None:
    brand, stars, jersey = load_dataset(TEXTVQA)
    # "Coca-Cola", "coca-cola", "the coca cola" normalise to "coca cola": 8 of 10 agree.
    assert score("Coca Cola", brand.answers, "vqa") == 1.0
    assert score("coke", brand.answers, "vqa") == pytest.approx(0.3)
    # "2", "two", "2." -> 5 humans say 2; "3", "three" -> 3 humans say 3.
    assert score("two", stars.answers, "vqa") == 1.0
    assert score("3", stars.answers, "vqa") == pytest.approx(0.9)
    assert score("4", stars.answers, "vqa") == pytest.approx(0.3)
    assert score("5", stars.answers, "vqa") == 0.0
    assert score("23", jersey.answers, "vqa") == 1.0


def test_textvqa_without_answers(tmp_path: Path) -> None:
    blob = {"data": [{"question_id": 1, "question": "q?", "image_id": "abc"}]}
    (tmp_path / "test.json").write_text(json.dumps(blob))
    (sample,) = load_dataset(tmp_path / "test.json")
    assert sample.answers == ()
    with pytest.raises(ValueError, match="no reference answers"):
        metric_for([sample])
    (tmp_path / "other.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ValueError, match="TextVQA"):
        load_dataset(tmp_path / "other.json")


def test_evaluate_per_family_and_missing() -> None:
    samples = [
        Sample(1, Path("a.png"), "q", ("red",), "color"),
        Sample(2, Path("b.png"), "q", ("blue",), "color"),
        Sample(3, Path("c.png"), "q", ("3",), "count"),
    ]
    report = evaluate(samples, {1: "Red", 2: "green", 3: "three"})
    assert report["metric"] == "exact"
    assert report["accuracy"] == pytest.approx(2 / 3)
    assert report["per_family"] == {"color": 0.5, "count": 1.0}
    assert report["missing"] == 0
    report = evaluate(samples, {1: "red"})
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert report["missing"] == 2
