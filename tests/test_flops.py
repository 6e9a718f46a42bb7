"""FLOPs accounting (docs/method.md section 7): closed forms, monotonicity,
budget inverses and the command line."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from redundancy.flops import (
    FlopsConfig,
    fastv_ratio_for_budget,
    flops_report,
    full_sequence_flops,
    image_part_flops,
    layer_flops,
    pdrop_lambda_for_budget,
    pdrop_ratio_closed_form,
    ranking_flops,
    run,
    vision_flops,
    vision_layer_flops,
)
from redundancy.presets import get_preset
from redundancy.schedule import DropSchedule, FastVSpec

REPO = Path(__file__).resolve().parents[1]
LLAVA15 = get_preset("llava-1.5-7b")
NEXT = get_preset("llava-next-7b")


# ------------------------------------------------------------- closed forms
def test_one_layer_by_hand() -> None:
    # n=2, d=3, m=5: 4*2*9 = 72 projections, 2*4*3 = 24 attention, 3*2*3*5 = 90 gated FFN
    assert layer_flops(2, 3, 5) == 72 + 24 + 90
    assert layer_flops(2, 3, 5, convention="fastv") == 72 + 24 + 60
    assert layer_flops(2, 3, 5, attention=False) == 72 + 90
    assert vision_layer_flops(2, 3, 5) == 72 + 24 + 60
    with pytest.raises(ValueError, match="convention='bogus'"):
        layer_flops(2, 3, 5, convention="bogus")  # type: ignore[arg-type]


def test_vanilla_llava15_image_part_is_the_papers_3_82_tflops() -> None:
    per_layer = 4 * 576 * 4096**2 + 2 * 576**2 * 4096 + 3 * 576 * 4096 * 11008
    flops = image_part_flops(LLAVA15, DropSchedule.vanilla())
    assert flops == 32 * per_layer
    assert round(flops / 1e12, 2) == 3.82


def test_closed_form_ratio_value() -> None:
    assert pdrop_ratio_closed_form(0.5, 4) == pytest.approx(0.46875, abs=1e-12)
    assert pdrop_ratio_closed_form(1.0, 4) == 1.0


@pytest.mark.parametrize("dims", [LLAVA15, NEXT], ids=lambda d: d.name)
@pytest.mark.parametrize("lam", [0.5, 0.25])
def test_pdrop_ratio_matches_closed_form_without_attention(dims, lam) -> None:
    sched = DropSchedule.pdrop(layers=(8, 16, 24), lam=lam)
    ratio = image_part_flops(dims, sched, attention=False) / image_part_flops(
        dims, DropSchedule.vanilla(), attention=False
    )
    # 576 and 2880 are divisible by 4^3, so floor() is exact and so is the ratio.
    assert ratio == pytest.approx(pdrop_ratio_closed_form(lam, 4), rel=1e-12)
    # The quadratic attention term shrinks faster than linearly, so the real ratio is lower.
    assert image_part_flops(dims, sched) / image_part_flops(dims, DropSchedule.vanilla()) < ratio


def test_full_sequence_adds_text_tokens_to_every_layer() -> None:
    per_layer = layer_flops(LLAVA15.n_text + 576, 4096, 11008)
    assert full_sequence_flops(LLAVA15, DropSchedule.vanilla()) == 32 * per_layer
    fastv = DropSchedule.fastv(K=2, R=0.5)
    expected = 2 * per_layer + 30 * layer_flops(LLAVA15.n_text + 288, 4096, 11008)
    assert full_sequence_flops(LLAVA15, fastv) == expected


def test_ranking_overhead_by_hand() -> None:
    kv_len = LLAVA15.n_text + 576
    fastv = DropSchedule.fastv(K=2, R=0.5)  # stage_last: keys already in layer K-1
    assert ranking_flops(LLAVA15, fastv) == kv_len * 4096
    assert ranking_flops(LLAVA15, fastv, n_query=7) == 7 * kv_len * 4096
    nxt = DropSchedule.fastv(K=2, R=0.5, rank_layer="next")  # + q of 1 row, k of kv_len rows
    assert ranking_flops(LLAVA15, nxt) == kv_len * 4096 + 4096 * 4096 + kv_len * 4096 * 4096
    # PyramidDrop ranks at three boundaries over 576, 288, 144 image tokens.
    pdrop = DropSchedule.pdrop(rank_layer="stage_last")
    assert ranking_flops(LLAVA15, pdrop) == sum((LLAVA15.n_text + n) * 4096 for n in (576, 288, 144))
    for ranker in ("random", "uniform"):
        assert ranking_flops(LLAVA15, DropSchedule.pdrop(ranker=ranker)) == 0
    with pytest.raises(ValueError, match="n_query=0"):
        ranking_flops(LLAVA15, fastv, n_query=0)


def test_vision_flops_by_hand() -> None:
    encoder = 24 * (4 * 577 * 1024**2 + 2 * 577**2 * 1024 + 2 * 577 * 1024 * 4096)
    patch_embed = 576 * 3 * 14 * 14 * 1024
    projector = 576 * (1024 * 4096 + 4096 * 4096)
    assert vision_flops(LLAVA15) == encoder + patch_embed + projector
    assert vision_flops(NEXT) == 5 * vision_flops(LLAVA15)


def test_report_fields_and_views() -> None:
    report = flops_report(LLAVA15, DropSchedule.pdrop(lam=0.5))
    assert report.stage_counts == (576, 288, 144, 72)
    assert report.avg_image_tokens == pytest.approx((576 + 288 + 144 + 72) / 4)
    assert report.tflops["image_part"] == pytest.approx(report.image_part / 1e12)
    assert report.image_part_ratio == pytest.approx(report.image_part / report.vanilla_image_part)
    assert 0 < report.ranking_share < 0.02
    assert "eq. 4" in report.convention and "1 MAC = 1 FLOP" in report.convention
    assert "2ndm" in flops_report(LLAVA15, DropSchedule.vanilla(), convention="fastv").convention


# ------------------------------------------------------------ monotonicity
def test_cost_falls_with_R_and_rises_with_lam_and_layer() -> None:
    grid = [i / 20 for i in range(21)]
    fastv = [image_part_flops(LLAVA15, DropSchedule.fastv(K=2, R=r)) for r in grid]
    pdrop = [image_part_flops(LLAVA15, DropSchedule.pdrop(lam=lam)) for lam in grid]
    drop = [image_part_flops(LLAVA15, DropSchedule.drop(layer=k, ratio=0.1)) for k in range(1, 32)]
    assert all(a > b for a, b in zip(fastv, fastv[1:]))
    assert all(a <= b for a, b in zip(pdrop, pdrop[1:])) and pdrop[0] < pdrop[-1]
    assert all(a < b for a, b in zip(drop, drop[1:]))
    assert pdrop[-1] == fastv[0] == image_part_flops(LLAVA15, DropSchedule.vanilla())


def test_layer_beyond_the_model_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"boundary 40 .*\[1, 31\]"):
        image_part_flops(LLAVA15, DropSchedule.drop(layer=40, ratio=0.1))


# ---------------------------------------------------------- budget inverse
def _fastv_cost(dims, R: float) -> int:
    return image_part_flops(dims, DropSchedule.fastv(K=2, R=R))


def _pdrop_cost(dims, lam: float) -> int:
    return image_part_flops(dims, DropSchedule.pdrop(layers=(8, 16, 24), lam=lam))


@pytest.mark.parametrize("dims", [LLAVA15, NEXT], ids=lambda d: d.name)
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.77, 0.99])
def test_fastv_budget_round_trip(dims, fraction) -> None:
    low, high = _fastv_cost(dims, 1.0), _fastv_cost(dims, 0.0)
    budget = (low + fraction * (high - low)) / 1e12
    R = fastv_ratio_for_budget(dims, budget, K=2)
    assert _fastv_cost(dims, R) <= budget * 1e12
    # One more kept token (the next smaller drop) no longer fits.
    assert _fastv_cost(dims, R - 1 / dims.n_image) > budget * 1e12


@pytest.mark.parametrize("dims", [LLAVA15, NEXT], ids=lambda d: d.name)
@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.77, 0.99])
def test_pdrop_budget_round_trip(dims, fraction) -> None:
    low, high = _pdrop_cost(dims, 0.0), _pdrop_cost(dims, 1.0)
    budget = (low + fraction * (high - low)) / 1e12
    lam = pdrop_lambda_for_budget(dims, budget, layers=(8, 16, 24))
    assert _pdrop_cost(dims, lam) <= budget * 1e12
    # The next larger lam at which some stage keeps one more token no longer fits.
    counts = DropSchedule.pdrop(lam=lam).stage_counts(dims.n_image)[1:]
    next_lam = min(((c + 1) / dims.n_image) ** (1 / s) for s, c in enumerate(counts, start=1))
    assert next_lam > lam
    assert _pdrop_cost(dims, min(next_lam, 1.0)) > budget * 1e12


def test_budget_above_vanilla_needs_no_drop() -> None:
    assert fastv_ratio_for_budget(LLAVA15, 100.0) == 0.0
    assert pdrop_lambda_for_budget(LLAVA15, 100.0) == 1.0


@pytest.mark.parametrize("solver", [fastv_ratio_for_budget, pdrop_lambda_for_budget])
@pytest.mark.parametrize("budget", [0.1, -1.0, math.nan])
def test_unreachable_budget_names_budget_and_range(solver, budget) -> None:
    with pytest.raises(ValueError, match=rf"budget={budget}.*\[\d+\.\d+, 3\.8172\] TFLOPs"):
        solver(LLAVA15, budget)


# ------------------------------------------------------------ command line
def _cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    return subprocess.run(
        [sys.executable, "-m", "redundancy.flops", *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )


def test_cli_prints_labelled_numbers_and_writes_nothing(tmp_path: Path) -> None:
    out = _cli("model=llava-1.5-7b", "method=pdrop", "method.lam=0.5", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    for label in ("preset", "method", "kept image tokens/stage", "avg image tokens/layer", "image-part TFLOPs",
                  "full-sequence TFLOPs", "ranking overhead", "vision+projector TFLOPs", "convention",
                  "ratio to vanilla"):
        assert label in out.stdout
    assert "576 -> 288 -> 144 -> 72" in out.stdout
    assert f"{image_part_flops(LLAVA15, DropSchedule.pdrop(lam=0.5)) / 1e12:.4f}" in out.stdout
    assert list(tmp_path.iterdir()) == []  # no outputs/, .hydra/ or log file


def test_cli_bad_ratio_exits_with_one_clear_line(tmp_path: Path) -> None:
    out = _cli("method=drop", "method.ratio=1.5", cwd=tmp_path)
    assert out.returncode == 2
    assert "1.5" in out.stderr and "[0, 1]" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


# -------------------------------------------------------- compose + run()
@pytest.fixture()
def compose_flops():
    def _compose(*overrides: str) -> FlopsConfig:
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO / "redundancy" / "conf" / "flops")):
            cfg = compose(config_name="flops", overrides=list(overrides))
        typed = OmegaConf.to_object(cfg)
        assert isinstance(typed, FlopsConfig)
        return typed

    return _compose


def test_config_composes_and_runs(compose_flops) -> None:
    cfg = compose_flops("method=fastv", "method.K=2", "method.R=0.5")
    assert (cfg.model, cfg.method) == ("llava-1.5-7b", FastVSpec(K=2, R=0.5))
    text = run(cfg)
    assert "576 -> 288" in text and "fastv(K=2, R=0.5" in text


def test_config_rejects_typo_keys(compose_flops) -> None:
    with pytest.raises(ConfigCompositionException):
        compose_flops("method.lamb=0.3")
    with pytest.raises(ConfigCompositionException, match="method/nope"):
        compose_flops("method=nope")


def test_run_budget_reports_the_solved_parameter(compose_flops) -> None:
    text = run(compose_flops("method=pdrop", "budget=2.0"))
    lam = pdrop_lambda_for_budget(LLAVA15, 2.0)
    assert f"lam={lam:.6f}" in text


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (("method=drop", "method.layer=40"), "boundary 40"),
        (("model=nope",), "model='nope'"),
        (("method=vanilla", "budget=2"), "budget=2.0"),
        (("method=fastv", "budget=0.01"), "budget=0.01"),
    ],
)
def test_run_bad_input_names_the_value(compose_flops, overrides, named) -> None:
    with pytest.raises(ValueError, match=re.escape(named)):
        run(compose_flops(*overrides))

