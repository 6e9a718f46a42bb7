"""The rankers study (conf/sweep/experiment/rankers.yaml): its grid, the accuracy split by where the
evidence lies, and its figures (redundancy/plots/spatial.py) on synthetic rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from redundancy.checkpoints import TEST_SET
from redundancy.data import QUESTIONS_FILE
from redundancy.plots import spatial as plots
from redundancy.results import fingerprint
from redundancy.stats import accuracy


def test_accuracy_split_by_evidence_position() -> None:
    scores = pd.Series([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], index=[f"q{i}" for i in range(7)])
    positions = {"q0": "top", "q1": "top", "q2": "bottom", "q3": "bottom", "q4": "bottom", "q5": "both",
                 "other": "top"}  # q6 has no position: left out
    split = plots.evidence_accuracy(scores, positions)
    assert set(split) == {"top", "bottom", "both"}
    assert split["top"] == accuracy([1.0, 0.0]) and split["bottom"] == accuracy([1.0, 1.0, 0.0])
    assert split["both"].n == 1 and split["bottom"].low < split["bottom"].value < split["bottom"].high


def test_positions_only_for_rows_of_the_shipped_test_set() -> None:
    rows = pd.DataFrame({"data_id": [fingerprint([TEST_SET / QUESTIONS_FILE])]})
    positions = plots.test_set_positions(rows)
    assert positions is not None and len(positions) == 600 and positions["test-000000"] == "bottom"
    assert plots.test_set_positions(pd.DataFrame({"data_id": ["another"]})) is None
    assert plots.test_set_positions(pd.DataFrame()) is None


def test_rankers_experiment_is_every_ranker_at_equal_flops() -> None:
    from redundancy import sweep
    from redundancy.schedule import RANKERS
    from tests.test_sweep import config

    cfg = config("experiment=rankers")
    assert cfg.study and cfg.out == "results/sweep" and sweep.spatial_enabled(cfg)
    points = sweep.schedules_from_config(cfg, 32, checkpoint_id="c")
    drops = [p for p in points if p.method == "drop"]
    assert points[0].is_vanilla and len(points) == 1 + 4 * 3 * (len(RANKERS) - 1 + 5)
    assert {p.ranker for p in drops} == set(RANKERS) == set(plots.RANKERS)
    assert {(p.boundaries[0], p.ratios[0]) for p in drops} == {(k, r) for k in (2, 8, 16, 24) for r in (0.1, 0.25, 0.5)}
    assert len({p.seed for p in drops if p.ranker == "random"}) == 4 * 3 * 5
    assert config("experiment=rankers", "model=micro-llava-pdrop").model.path == "micro-llava-pdrop"
