"""Where the kept image tokens lie (redundancy/spatial.py), recorded in a sweep's rows: the counts equal
the kept indices counted by hand from the engine's trace, the sinks an independent count."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from redundancy import spatial, sweep
from redundancy.data import load_dataset
from redundancy.engine import apply_schedule
from redundancy.grid import encode
from redundancy.loading import TEST_SET, load_model
from redundancy.ranking import sink_mask
from redundancy.results import load_results, load_samples
from redundancy.schedule import DropSchedule
from tests.helpers import ROOT, save_tiny_micro, tiny

SIDE = 4  # the tiny micro-LLaVA: 32 px images, 8 px patches
RATIO = 1.04  # a sink threshold the tiny random model's states reach (the real one, 20, finds none there)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_micro(tmp_path_factory.mktemp("tiny-micro"))


def by_hand(model: Any, processor: Any, schedule: DropSchedule, n: int) -> tuple[np.ndarray, int, int, int]:
    """Kept tokens per grid cell from the engine's trace, one question at a time; the kept sinks, the
    sinks present and the kept tokens, the sinks found on the unmodified model's states leaving layer K-1."""
    counts, kept_sinks, present_sinks, kept_total = np.zeros((SIDE, SIDE), int), 0, 0, 0
    (layer,) = schedule.boundaries
    for sample in load_dataset(TEST_SET)[:n]:
        inputs = encode(processor, [sample], torch.device("cpu"))
        with torch.no_grad():
            with apply_schedule(model, schedule) as trace:
                model(**inputs)
            states = model(**inputs, output_hidden_states=True).hidden_states[layer][0]  # leaving layer K-1
        kept = trace.boundaries[0].kept[0].numpy()
        np.add.at(counts, (kept // SIDE, kept % SIDE), 1)
        image = (inputs["input_ids"][0] == model.config.image_token_id).numpy()
        norms = states[torch.from_numpy(image)].norm(dim=-1).numpy()
        median = np.sort(norms)[(len(norms) - 1) // 2]  # torch's median: the lower middle value
        sinks = np.flatnonzero(norms >= RATIO * median)
        kept_sinks += int(np.isin(kept, sinks).sum())
        present_sinks += len(sinks)
        kept_total += len(kept)
    return counts, kept_sinks, present_sinks, kept_total


def test_row_counts_equal_the_trace_and_sinks_an_independent_count(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spatial, "sink_mask", functools.partial(sink_mask, ratio=RATIO))
    grid = ("layer=[2,4]", "ratio=0.5", "method.ranker=[last,norope,random]", "spatial=true")
    sweep.run(tiny(tiny_dir, tmp_path / "shared", *grid))
    sweep.run(tiny(tiny_dir, tmp_path / "separate", *grid, "share=false"))
    sweep.run(tiny(tiny_dir, tmp_path / "off", *grid[:-1]))
    answers = [load_samples(tmp_path / name).sort_values(["key", "question_id"])[["key", "prediction", "kept"]]
               for name in ("shared", "off")]
    assert answers[0].to_dict("records") == answers[1].to_dict("records")  # counting changes no answer
    rows = load_results(tmp_path / "shared")
    separate = load_results(tmp_path / "separate").set_index("key")
    model, processor = load_model(tiny_dir)
    found_sinks = 0
    for _, row in rows.iterrows():
        part = row["spatial"]
        assert part["questions"] == row["n"] == 6
        assert part["image"]["grids"] == {"4x4": [[6] * SIDE] * SIDE}  # every image token of 6 questions
        if row["method"] == "vanilla":
            assert part["boundaries"] == []
            continue
        (b,) = part["boundaries"]
        schedule = DropSchedule.drop(int(row["layer"]), 0.5, ranker=row["ranker"])
        if row["ranker"] == "random":
            schedule = DropSchedule.drop(int(row["layer"]), 0.5, ranker="random", seed=int(row["seed"]))
        counts, kept_sinks, present_sinks, kept_total = by_hand(model, processor, schedule, 6)
        assert b["layer"] == row["layer"] and b["tokens"] == kept_total == 6 * 8
        assert np.array_equal(np.asarray(b["grids"]["4x4"]), counts), row["point"]
        assert b["rows"]["4x4"] == counts.sum(1).tolist() and b["cols"]["4x4"] == counts.sum(0).tolist()
        assert (b["sinks"], b["sinks_present"]) == (kept_sinks, present_sinks), row["point"]
        assert spatial.sink_share(b) == kept_sinks / kept_total
        found_sinks += kept_sinks
        # The replayed first stage (shared prefix) and the layers run one point at a time count alike.
        assert separate.loc[row["key"], "spatial"] == part
    assert found_sinks > 0  # the sink count was exercised
    assert found_sinks < sum(
        r["spatial"]["boundaries"][0]["tokens"] for _, r in rows.iterrows() if r["method"] != "vanilla"
    )
    samples = load_samples(tmp_path / "shared")
    assert "spatial" not in samples.columns  # per-question counts stay out of the committed records
    for _, row in rows[rows["method"] != "vanilla"].iterrows():  # what they keep sums to the row's counts
        mine = samples[samples["key"] == row["key"]]
        (b,) = row["spatial"]["boundaries"]
        assert mine["kept_bottom"].map(sum).sum() == sum(b["rows"]["4x4"][2:])
        assert mine["kept_sinks"].map(sum).sum() == b["sinks"]
        assert mine["present_sinks"].map(sum).sum() == b["sinks_present"]


def test_rows_without_the_diagnostics_and_off_by_default(tiny_dir: Path, tmp_path: Path) -> None:
    sweep.run(tiny(tiny_dir, tmp_path, "layer=2", "ratio=0.5"))
    (row,) = load_results(tmp_path).to_dict("records")
    assert row["spatial"] is None
    assert sweep.spatial_enabled(tiny(tiny_dir, tmp_path, "study=true"))


def test_bottom_share_and_summaries() -> None:
    part = {"grids": {"4x4": [[0] * 4, [1] * 4, [1] * 4, [2] * 4]}, "rows": {"4x4": [0, 4, 4, 8]}}
    assert spatial.bottom_share(part) == pytest.approx(12 / 16)
    part = {"grids": {"3x1": [[1], [2], [1]]}, "rows": {"3x1": [1, 2, 1]}}
    assert spatial.bottom_share(part) == pytest.approx(0.5)  # the middle row counts half
    assert spatial.summarise([None]) is None and spatial.summarise([]) is None
    one = {"image": {"grids": {"1x2": [1, 1]}, "tokens": 2}, "layers": [3],
           "boundaries": [{"grids": {"1x2": [1, 0]}, "tokens": 1, "sinks": 1, "sinks_present": 1}]}
    total = spatial.summarise([one, one])
    assert total is not None and total["boundaries"][0]["grids"] == {"1x2": [[2, 0]]}
    assert total["boundaries"][0]["layer"] == 3 and spatial.sink_share(total["boundaries"][0]) == 1.0


def test_layouts_of_each_family() -> None:
    from tests.helpers import make_batch, n_image_tokens, tiny_model

    llava = tiny_model("llava")
    n = n_image_tokens(llava)
    (layout,) = spatial.image_layouts(llava, {}, [n])
    side = int(np.sqrt(n))
    assert set(layout.grids) == {f"{side}x{side}"} and list(layout.cells) == list(range(n))
    nxt = tiny_model("llava_next")
    sizes = [(30, 50)]
    batch = make_batch(nxt, [(2, 3)], image_hw=sizes)
    (layout,) = spatial.image_layouts(nxt, batch, [n_image_tokens(nxt, sizes[0])])
    assert layout.crops is not None and len(layout.crops) == len(layout.grids)
    names = list(dict.fromkeys(layout.grids))
    base, high = spatial.grid_shape(names[0]), spatial.grid_shape(names[-1])
    assert (layout.crops[: base[0] * base[1]] == 0).all()
    newline = layout.crops[base[0] * base[1]:].reshape(high)[:, -1]
    assert (newline == -1).all() and layout.crops.max() >= 1


def test_every_committed_study_point_has_its_spatial_counts() -> None:
    """Issue 29: every point of the published study carries where its kept image tokens lie (rows
    and columns of each image grid, per boundary, over every question it answered)."""
    rows = load_results(ROOT / "results" / "sweep")
    assert len(rows) > 1000
    missing = rows[rows["spatial"].isna()]
    assert missing.empty, f"{len(missing)} points without spatial counts, e.g. {missing['point'].tolist()[:3]}"
    for method, n, counts in zip(rows["method"], rows["n"], rows["spatial"]):
        assert counts["questions"] == n and counts["image"]["rows"] and counts["image"]["cols"]
        assert (len(counts["boundaries"]) > 0) == (method != "vanilla")
        assert all(b["rows"] and b["cols"] for b in counts["boundaries"])
