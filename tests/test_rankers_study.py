"""The rankers study (conf/sweep/experiment/rankers.yaml): its grid, the accuracy split by where the
evidence lies, and its figures (redundancy/plots/spatial.py) on synthetic rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from redundancy.data import QUESTIONS_FILE
from redundancy.loading import TEST_SET
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
    from tests.helpers import sweep_config as config

    cfg = config("experiment=rankers")
    assert cfg.study and cfg.out == "results/sweep" and sweep.spatial_enabled(cfg)
    points = sweep.schedules_from_config(cfg, 32, checkpoint_id="c")
    drops = [p for p in points if p.method == "drop"]
    assert points[0].is_vanilla and len(points) == 1 + 4 * 3 * (len(RANKERS) - 1 + 5)
    assert {p.ranker for p in drops} == set(RANKERS) == set(plots.RANKERS)
    assert {(p.boundaries[0], p.ratios[0]) for p in drops} == {(k, r) for k in (2, 8, 16, 24) for r in (0.1, 0.25, 0.5)}
    assert len({p.seed for p in drops if p.ranker == "random"}) == 4 * 3 * 5
    assert config("experiment=rankers", "model=micro-llava-pdrop").model.path == "micro-llava-pdrop"


# ---------------------------------------------------------------- figures
@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from redundancy.results import load_results, load_samples
    from tests.worlds import rankers_world

    root = rankers_world(tmp_path_factory.mktemp("rankers") / "sweep")
    return {"root": root.parent, "rows": load_results(root), "samples": load_samples(root)}


def test_kept_heatmaps_and_accuracy_by_ranker(study: dict[str, Any]) -> None:
    import warnings

    from matplotlib.colors import to_hex
    from matplotlib.text import Text

    from redundancy.plots.frames import MissingInput
    from redundancy.plots.style import MIN_FONT, OKABE_ITO, PAGE_WIDTH

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingInput)
        heat = plots.kept_heatmap_figure(study["rows"], "micro-llava-vanilla", 2, 0.1)
        acc = plots.ranker_accuracy_figure(study["rows"], ["micro-llava-vanilla", "micro-llava-pdrop"], [2, 16], 0.1)
    notes = [str(w.message) for w in caught]
    assert "micro-llava-vanilla layer 2 r=0.1 vision_cls: no row" in notes  # rankers the rows lack are named
    images = [ax.get_images()[0] for ax in heat.axes if ax.get_images()]
    titles = [ax.get_title() for ax in heat.axes if ax.get_images()]
    assert titles[:2] == ["last: bottom 86%", "mean: bottom 50%"] and len(images) == 7  # 7 rankers recorded
    last = images[0].get_array()
    assert last.shape == (12, 12) and last[-1].sum() == 12 and last[:6].sum() == 2  # 12 bottom cells, 2 top
    for fig in (heat, acc):
        width, height = fig.get_size_inches()
        assert width <= PAGE_WIDTH + 1e-9 and height / width >= 0.4
        texts = [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
        assert min(t.get_fontsize() for t in texts) >= MIN_FONT
    points = [line for ax in acc.axes for line in ax.get_lines() if line.get_marker() == "o"]
    assert {to_hex(line.get_color()) for line in points} == {c.lower() for c in OKABE_ITO[:2]}
    first = acc.axes[0]
    assert [t.get_text() for t in first.get_xticklabels()] == list(plots.RANKERS)


def test_figures_command_draws_the_study_and_skips_without_it(study: dict[str, Any], tmp_path: Path) -> None:
    from redundancy import figures

    report = figures.run(figures.config(f"results={study['root']}", "formats=[png]", "dpi=40", "progress=false"))
    for name in ("fig_rankers_kept_layer2", "fig_rankers_kept_layer16", "fig_rankers_accuracy"):
        assert (study["root"] / "figures" / f"{name}.png").is_file(), report
    assert "fig_rankers_kept_layer8: skipped (no spatial counts for micro-llava-vanilla at layer 8" in report
    claims = (study["root"] / "claims.md").read_text()
    assert "| 12 | FEATHER (positional bias) |" in claims and "**reproduced**" in claims
    empty = figures.run(figures.config(f"results={tmp_path}", "formats=[png]", "progress=false"))
    assert "fig_rankers_accuracy: skipped" in empty and "not run" in (tmp_path / "claims.md").read_text()
