"""The claims table (redundancy/claims.py) on synthetic results whose verdicts are known by construction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from redundancy import claims, figures
from redundancy.claims import INCONCLUSIVE, MISSING, REPRODUCED, REVERSED, Inputs, Settings, claims_table
from redundancy.plots.records import MapRecord, Question
from redundancy.schedule import DropSchedule
from redundancy.stats import compare
from tests.worlds import rankers_world

N = 400  # questions: the first half reading, the second half colour
FAMILY = ["reading"] * (N // 2) + ["color"] * (N // 2)
IDS = [f"q{i:03d}" for i in range(N)]
VANILLA_TFLOPS = 1.0


def scores(correct: int, first: int = 0) -> np.ndarray:
    """0/1 scores with questions ``first .. first + correct - 1`` right (nested sets: one point's right
    answers contain another's, so every discordant pair goes one way)."""
    out = np.zeros(N)
    out[first:first + correct] = 1.0
    return out


class Results:
    """Rows and per-sample records built point by point (the columns the claims read)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.samples: list[pd.DataFrame] = []

    def add(self, model: str, schedule: DropSchedule, values: np.ndarray, tflops: float = VANILLA_TFLOPS) -> None:
        key = f"k{len(self.rows):04d}"
        params = " ".join(f"{k}={v}" for k, v in schedule.params.items())
        first = schedule.boundaries[0] if schedule.boundaries else None
        self.rows.append({
            "key": key, "created": "2026-01-01T00:00:00", "model": model, "data": "microvqa",
            "point": f"{schedule.method} {params}".strip(), "method": schedule.method,
            "layer": first if schedule.method in ("drop", "fastv") else None,
            "ratio": schedule.ratios[0] if schedule.method in ("drop", "fastv") else None,
            "boundaries": list(schedule.boundaries), "ranker": schedule.ranker, "rank_layer": schedule.rank_layer,
            "positions": schedule.positions, "n": N, "accuracy": float(values.mean()),
            "image_tflops": tflops, "full_tflops": tflops + 1.0,
            **{f"params.{k}": v for k, v in schedule.params.items()},
        })
        self.samples.append(pd.DataFrame({"key": key, "question_id": IDS, "family": FAMILY, "score": values}))

    def inputs(self, settings: Settings, maps: dict[str, MapRecord] | None = None) -> Inputs:
        return Inputs(pd.DataFrame(self.rows), pd.concat(self.samples, ignore_index=True), maps or {}, settings)


def card(folder: Path, name: str, final_s: float) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "card.json").write_text(json.dumps({"name": name, "training_wall_s": {"a": 100.0, "final": final_s}}))
    return str(folder)


def attention_maps(model: str, questions: int = 20, grid: int = 6) -> MapRecord:
    """Layer 2 spread over every token, layer 16 on two tokens (Fig. 1b's shape, by construction)."""
    n = grid * grid
    rng = np.random.default_rng(0)
    attention = np.empty((questions, 2, n), np.float32)
    attention[:, 0] = 1.0 + 0.1 * rng.random((questions, n))
    attention[:, 1] = 0.01
    attention[:, 1, :2] = 1.0
    qs = [Question(f"q{i}", "What?", ["a"], "color", "a", "a") for i in range(questions)]
    return MapRecord(model=model, checkpoint_id="c", grid=grid, num_layers=32, query="last", layers=[2, 16],
                     schedule={"boundaries": []}, questions=qs, images=[np.zeros((4, 4, 3), np.uint8)] * questions,
                     attention=attention, kept=np.zeros((questions, 0, n), bool))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("claims")
    vanilla = card(root / "v", "v", final_s=100.0)
    trained = card(root / "p", "p", final_s=52.0)  # 0.52 of vanilla's time; FLOPs ratio below: (0.5+1)/(1+1)=0.75
    r = Results()
    accuracy = {2: (200, 280), 8: (240, 300), 16: (360, 360), 24: (360, 360)}  # right answers at r = 0, 0.1
    for model, worse in ((vanilla, 0), (trained, 60)):
        r.add(model, DropSchedule.vanilla(), scores(360))
        for layer, (at0, at01) in accuracy.items():
            loss = worse if layer == 16 else 0  # the PyramidDrop-trained model loses more at layer 16
            r.add(model, DropSchedule.drop(layer, 0.0), scores(at0 - loss))
            r.add(model, DropSchedule.drop(layer, 0.1), scores(at01 - loss))
    r.add(vanilla, DropSchedule.fastv(R=0.5), scores(300), tflops=0.5)
    r.add(vanilla, DropSchedule.pdrop(lam=0.5), scores(340), tflops=0.5)
    # Fig. 4: at budgets 0.3 and 0.8, PyramidDrop and FastV answer the same questions (no gap)
    r.add(vanilla, DropSchedule.fastv(R=0.8), scores(250), tflops=0.3)
    r.add(vanilla, DropSchedule.pdrop(lam=0.2), scores(250), tflops=0.3)
    r.add(vanilla, DropSchedule.fastv(R=0.3), scores(330), tflops=0.8)
    r.add(vanilla, DropSchedule.pdrop(lam=0.85), scores(330), tflops=0.8)
    # Table 4: lam=0.4 loses 60 reading questions (of 200) that lam=0.6 answers; colour: nothing
    r.add(vanilla, DropSchedule.pdrop(lam=0.6), scores(360))
    r.add(vanilla, DropSchedule.pdrop(lam=0.4), scores(300, first=60) + scores(0))
    settings = Settings(model=vanilla, trained=(vanilla, trained), budgets=(0.3, 0.8), lambdas=(0.4, 0.6))
    return {"inputs": r.inputs(settings, {"m": attention_maps(vanilla)}), "results": r, "settings": settings}


def outcomes(inp: Inputs) -> dict[int, claims.Outcome]:
    return {row.claim.number: row.outcome for row in claims_table(inp)}


def test_every_claim_gets_the_verdict_its_data_were_built_for(world: dict[str, Any]) -> None:
    got = outcomes(world["inputs"])
    assert sorted(got) == list(range(1, 17))
    expected = {
        1: REPRODUCED,  # layer 2 loses 160 and 80 of 400 answers
        2: INCONCLUSIVE,  # 16 and 24 answer the same questions: "16 < 24" cannot separate
        3: REPRODUCED,  # layer 16 at 10% = vanilla
        4: REPRODUCED,  # layer 24 with no image token = vanilla
        5: REPRODUCED,  # entropy and top-10% mass, 20 questions
        6: REVERSED,  # the PyramidDrop-trained model loses 60 more answers at layer 16
        7: MISSING,  # no FastV row on the PyramidDrop-trained model
        8: REPRODUCED,  # PyramidDrop 340 vs FastV 300 right answers
        9: INCONCLUSIVE,  # no gap at either budget
        10: REPRODUCED,  # the smaller lambda costs 30% of the reading answers, nothing on colour
        11: REVERSED,  # 0.52 of the time against a FLOPs ratio of 0.75
        **{k: MISSING for k in range(12, 17)},  # the rankers study: not run
    }
    assert {k: o.verdict for k, o in got.items()} == expected
    assert got[1].n == "600" or got[1].n == str(N)
    assert "table5_inference model=" in got[7].missing[0] and got[7].missing[0].endswith(
        "model=" + world["settings"].trained[1] + ")"
    )


def test_a_reversed_effect_flips_the_verdict(world: dict[str, Any]) -> None:
    """Claim 8's test with the data turned around (FastV above PyramidDrop): reversed; no gap: inconclusive."""
    model = world["settings"].model
    for fastv, pdrop, verdict in ((340, 300, REVERSED), (320, 320, INCONCLUSIVE)):
        r = Results()
        r.add(model, DropSchedule.vanilla(), scores(360))
        r.add(model, DropSchedule.fastv(R=0.5), scores(fastv), tflops=0.5)
        r.add(model, DropSchedule.pdrop(lam=0.5), scores(pdrop), tflops=0.5)
        assert outcomes(r.inputs(world["settings"]))[8].verdict == verdict


def test_equivalence_margin_decides_no_obvious_decline() -> None:
    base = pd.Series(scores(360), index=IDS)
    small = compare(pd.Series(scores(356), index=IDS), base)  # -1 point, interval inside the 2-point margin
    large = compare(pd.Series(scores(300), index=IDS), base)  # -15 points
    middle = compare(pd.Series(scores(352), index=IDS), base)  # -2 points: the interval straddles -2
    assert [claims.equivalent(c) for c in (small, large, middle)] == [REPRODUCED, REVERSED, INCONCLUSIVE]


def test_missing_inputs_say_what_to_run(world: dict[str, Any]) -> None:
    empty = Inputs(pd.DataFrame(), pd.DataFrame(), {}, world["settings"])
    got = outcomes(empty)
    assert all(o.verdict == MISSING and o.missing for o in got.values())
    assert "experiment=fig1_redundancy" in got[1].missing[0] and "redundancy.maps" in got[5].missing[0]
    text = claims.markdown(claims_table(empty))
    assert text.count("**not computed yet**") == 16 and "missing: " in text
    assert all(got[k].number == "not run" and claims.RANKERS_COMMAND in got[k].missing for k in range(12, 17))


def test_markdown_has_one_row_per_claim_and_the_seeded_controls(world: dict[str, Any], tmp_path: Path) -> None:
    r: Any = world["results"]
    vanilla = world["settings"].model
    for seed in range(3):  # the random control at layer 2, r=0.1: 5, 10, 15 answers fewer than attention
        r.add(vanilla, DropSchedule.drop(2, 0.1, ranker="random").seeded("c", seed), scores(275 - 5 * seed))
    inp = r.inputs(world["settings"])
    path = claims.write_claims(inp, tmp_path / "claims.md")
    text = path.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 16 + 1  # the claims, then the control's row
    # attention 280/400; the seeds 275, 270, 265: mean 67.5, sd 1.25; each seed's gap (5, 10, 15 answers one
    # way) separates for 10 and 15 (exact McNemar, Holm across the 3 seeds)
    assert "| 2 | 0.1 | 70.0 | 67.5 +- 1." in text and "(3 seeds, min 66.2, max 68.8) | 2 of 3 | +2.5 |" in text
    controls = claims.seeded_controls(inp)
    assert [(layer, ratio, s.seeds) for layer, ratio, s in controls] == [(2, 0.1, [0, 1, 2])]


def test_figures_command_writes_the_claims(world: dict[str, Any], tmp_path: Path) -> None:
    s = world["settings"]
    cfg = figures.config(f"results={tmp_path}", f"claims={tmp_path}/claims.md", f"model={s.model}",
                         f"trained=[{s.trained[0]},{s.trained[1]}]", "budgets=[0.3,0.8]", "lambdas=[0.4,0.6]")
    rows = world["inputs"].rows
    paths = figures.write_claims_of(cfg, rows, world["inputs"].samples, {})
    path = paths[0]
    assert path == tmp_path / "claims.md" and "| 11 | Training cost |" in path.read_text()
    # one figure per claim with comparisons, named by its number; claim 11 (one timed run) has none
    table = claims.claims_table(claims.Inputs(rows, world["inputs"].samples, {}, figures.claims_settings(cfg)))
    with_comparisons = {row.claim.number for row in table if row.outcome.comparisons}
    assert with_comparisons and 11 not in with_comparisons
    assert {p.stem for p in paths[1:]} == {f"claim_{n:02d}" for n in with_comparisons}
    assert all(p.exists() for p in paths)
    assert figures.claims_settings(cfg).fastv_point == "fastv K=2 R=0.5"


def test_detects_column_is_the_range_of_the_comparisons_detectable_differences() -> None:
    from redundancy.stats import compare

    a, b = np.r_[np.ones(60), np.zeros(540)], np.zeros(600)
    one, two = compare(a, b), compare(a[:300], b[:300])
    assert (
        claims.detects(claims.Outcome("x", "600", claims.INCONCLUSIVE, [("one", one)])) == f"{100 * one.detectable:.1f}"
    )
    both = claims.detects(claims.Outcome("x", "600", claims.INCONCLUSIVE, [("one", one), ("two", two)]))
    assert both == f"{100 * one.detectable:.1f}-{100 * two.detectable:.1f}" and two.detectable > one.detectable
    assert claims.detects(claims.missing("rows")) == "-"


# ---------------------------------------------------------------- the critiques (the rankers study)
def rankers_inputs(root: Path) -> Inputs:
    return Inputs.load(root, root / "maps", Settings())


def test_critiques_get_the_verdicts_their_data_were_built_for(tmp_path: Path) -> None:
    got = outcomes(rankers_inputs(rankers_world(tmp_path)))
    assert {k: got[k].verdict for k in range(12, 17)} == {
        12: REPRODUCED,  # 12 of 14 kept tokens in the bottom half under last, 7 under norope
        13: REPRODUCED,  # last loses exactly the top-evidence questions
        14: REPRODUCED,  # nosink answers what last answers
        15: REPRODUCED,  # random, uniform and pool answer what last answers
        16: REPRODUCED,  # mean answers the 107 top-evidence questions last loses
    }
    assert "last 0.86, norope 0.50" in got[12].number and len(got[12].comparisons) == 2 * 2 * 2
    assert got[12].n == "600" and got[13].n == "224"  # 117 bottom- + 107 top-evidence questions
    assert "sinks among last's kept tokens: micro-llava-vanilla, layer 2: 7.1%" in got[14].number
    assert len(got[15].comparisons) == 3 * 2 * 2 and all(c.p_holm is not None for _, c in got[15].comparisons)
    assert "bottom-evidence 100.0" in got[13].number and "top-evidence 0.0" in got[13].number


def test_critiques_reversed_when_the_data_turn_around(tmp_path: Path) -> None:
    got = outcomes(rankers_inputs(rankers_world(tmp_path, bottom_wins=False)))
    assert got[13].verdict == REVERSED  # last loses the bottom-evidence questions instead
    assert got[15].verdict == REPRODUCED and got[12].verdict == REPRODUCED


def test_critiques_on_rows_written_before_the_spatial_counts(tmp_path: Path) -> None:
    got = outcomes(rankers_inputs(rankers_world(tmp_path, spatial_counts=False)))
    assert got[12].verdict == MISSING and "written before the spatial diagnostics" in got[12].missing[0]
    assert got[13].verdict == REPRODUCED and got[14].verdict == REPRODUCED  # accuracy needs no counts
    assert "sinks not counted" in got[14].number


def test_sinks_claim_is_not_testable_without_sinks(tmp_path: Path) -> None:
    """No image token passes the sink rule: nosink ranks as last, so "removing the sinks barely
    changes the answer" holds vacuously; the verdict says the claim is not testable on these models
    (with sinks present, the same answers give "reproduced":
    test_critiques_get_the_verdicts_their_data_were_built_for)."""
    got = outcomes(rankers_inputs(rankers_world(tmp_path / "store", sinks=0)))
    assert got[14].verdict == claims.UNTESTABLE and "no image token" in got[14].note
