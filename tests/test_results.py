"""The result store: keys, atomic point files, merging (redundancy/results.py; intervals: tests/test_stats.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from redundancy.results import (
    ResultStore,
    checkpoint_fingerprint,
    fingerprint,
    load_results,
    load_samples,
    point_key,
)


def test_point_key_is_canonical() -> None:
    a = {"model": {"checkpoint_id": "x", "dtype": "float32"}, "schedule": {"boundaries": [16], "ratios": [0.1]}}
    b = {"schedule": {"ratios": [0.1], "boundaries": [16]}, "model": {"dtype": "float32", "checkpoint_id": "x"}}
    assert point_key(a) == point_key(b) and len(point_key(a)) == 16
    c = {**a, "schedule": {"boundaries": [16], "ratios": [0.25]}}
    assert point_key(c) != point_key(a)


def _row(key: str, created: str, accuracy: float) -> dict:
    return {"key": key, "created": created, "accuracy": accuracy, "per_family": {"color": accuracy},
            "config": {"model": {"path": "m"}}}


def test_store_round_trip_and_crash_leftovers(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    assert not store.done("k1") and store.partial("k1") == {}
    store.append_partial("k1", [{"question_id": 1, "prediction": "red"}, {"question_id": 2, "prediction": "blue"}])
    with (tmp_path / "partial" / "k1.jsonl").open("a") as f:
        f.write('{"question_id": 3, "predic')  # a crash in the middle of a write
    assert sorted(store.partial("k1")) == [1, 2]
    records = [{"question_id": q, "prediction": p} for q, p in ((1, "red"), (2, "blue"), (3, "two"))]
    store.finish("k1", _row("k1", "2026-01-01T00:00:00", 0.5), records)
    assert store.done("k1") and store.row("k1")["accuracy"] == 0.5
    assert not (tmp_path / "partial" / "k1.jsonl").exists()
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written stays behind
    samples = load_samples(tmp_path)
    assert list(samples["key"]) == ["k1"] * 3 and list(samples["prediction"]) == ["red", "blue", "two"]


def test_stores_from_several_processes_merge_without_duplicates(tmp_path: Path) -> None:
    a, b, merged = ResultStore(tmp_path / "a"), ResultStore(tmp_path / "b"), tmp_path / "merged"
    a.finish("k1", _row("k1", "2026-01-01T00:00:01", 0.5), [{"question_id": 1}])
    a.finish("k2", _row("k2", "2026-01-01T00:00:02", 0.25), [{"question_id": 1}])
    b.finish("k2", _row("k2", "2026-01-01T00:00:02", 0.25), [{"question_id": 1}])  # the same point, computed twice
    b.finish("k3", _row("k3", "2026-01-01T00:00:03", 0.75), [{"question_id": 1}])
    for store in (a, b):
        shutil.copytree(store.root, merged, dirs_exist_ok=True)
    df = load_results(merged)
    assert list(df["key"]) == ["k1", "k2", "k3"]
    assert {"per_family.color", "config.model.path"} <= set(df.columns)
    assert len(load_samples(merged)) == 3


def test_load_results_of_nothing(tmp_path: Path) -> None:
    assert load_results(tmp_path).empty and load_samples(tmp_path).empty


def test_fingerprint_ignores_location(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    (one / "config.json").write_text(json.dumps({"a": 1}))
    (one / "model.safetensors").write_bytes(b"\x00" * 1000)
    (one / "README.md").write_text("not part of the model")
    shutil.copytree(one, two)
    (two / "README.md").write_text("edited")
    assert checkpoint_fingerprint(one) == checkpoint_fingerprint(two)
    (two / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert checkpoint_fingerprint(one) != checkpoint_fingerprint(two)
    assert fingerprint([one / "config.json"]) == fingerprint([two / "config.json"])
