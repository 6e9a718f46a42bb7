"""Recording attention maps and kept tokens (redundancy/maps.py) on a tiny micro-LLaVA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from redundancy import maps
from redundancy.data import Sample, load_dataset
from redundancy.engine import apply_schedule
from redundancy.evaluate import prompts
from redundancy.loading import TEST_SET, load_model
from redundancy.plots.records import load_maps
from redundancy.schedule import DropSchedule, PDropSpec, kept_count
from tests.helpers import LAYERS, save_tiny_micro


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_micro(tmp_path_factory.mktemp("tiny-micro"))


def test_choose_questions() -> None:
    samples = load_dataset(TEST_SET)[:40]
    first = maps.choose(samples, [], per_family=1)
    assert len({s.family for s in first}) == len(first) == len({s.family for s in samples})
    named = ["test-000004", "test-000000"]
    assert [s.question_id for s in maps.choose(samples, named, 1)] == named
    with pytest.raises(ValueError, match="not in the data"):
        maps.choose(samples, ["nope"], 1)


def test_evidence_tokens_follow_the_boxes() -> None:
    sample = Sample("q", Path("x.png"), "?", ("a",), "color",
                    meta={"objects": [{"box": [0, 0, 16]}, {"box": [88, 88, 8]}], "evidence": [0, 1]})

    class Vision:
        image_size, patch_size = 96, 8

    class Config:
        vision_config = Vision()

    class Model:
        config = Config()

    tokens = maps.evidence_tokens(sample, Image.new("RGB", (96, 96)), Model())
    assert tokens == [0, 1, 12, 13, 143]
    assert maps.evidence_tokens(sample, Image.new("RGB", (64, 64)), Model()) == []  # resized: boxes do not map


def test_record_matches_the_engine(tiny_dir: Path, tmp_path: Path) -> None:
    cfg = maps.MapsConfig(model=str(tiny_dir), out=str(tmp_path), questions=["test-000000", "test-000001"],
                          method=PDropSpec(layers=[2, 4], lam=0.5), threads=1)
    report = maps.run(cfg)
    (path,) = tmp_path.glob("*.npz")
    assert str(path) in report and path.stat().st_size < 64 * 1024
    record = load_maps(path)
    n = record.grid**2
    assert record.grid == 4 and record.layers == list(range(LAYERS)) and record.boundaries == [2, 4]
    assert record.attention.shape == (2, LAYERS, n) and record.kept.shape == (2, 2, n)
    assert [int(k.sum()) for k in record.kept[0]] == [kept_count(n, 0.5), kept_count(n, 0.25)]
    assert np.all(record.kept[:, 1] <= record.kept[:, 0])  # dropped tokens do not come back
    assert record.images[0].shape == (32, 32, 3) and record.images[0].dtype == np.uint8

    # The recorded maps are the engine's own record of the unmodified model (stored as float16).
    model, processor = load_model(tiny_dir)
    sample = load_dataset(TEST_SET)[0]
    inputs = processor(images=[Image.open(sample.image_path).convert("RGB")], text=prompts(processor, [sample]),
                       return_tensors="pt")
    with torch.no_grad(), apply_schedule(model, DropSchedule.vanilla(), record_attention=[0, 3]) as trace:
        model(**inputs)
    for layer in (0, 3):
        assert np.allclose(record.attention[0, layer], trace.attention[layer][0].numpy(), rtol=2e-3, atol=1e-5)
    assert record.questions[0].question_id == "test-000000" and record.questions[0].evidence == []  # 96 px -> 32 px


def test_refuses_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="query="):
        maps.run(maps.MapsConfig(query="first", out=str(tmp_path)))
    with pytest.raises(ValueError, match="lam"):
        maps.run(maps.MapsConfig(method=PDropSpec(lam=2.0), out=str(tmp_path)))
