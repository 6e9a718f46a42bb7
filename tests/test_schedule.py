"""Schedules and kept counts in closed form."""

from __future__ import annotations

import pytest

from redundancy.schedule import DropSchedule, kept_count


@pytest.mark.parametrize(
    ("n", "r", "expected"),
    [(576, 0.0, 0), (576, 0.1, 57), (576, 0.5, 288), (576, 1.0, 576), (100, 0.29, 29), (2880, 0.125, 360),
     (7, 0.99, 6)],
)
def test_kept_count_is_floor(n: int, r: float, expected: int) -> None:
    assert kept_count(n, r) == expected


def test_pdrop_official_counts() -> None:
    s = DropSchedule.pdrop()
    assert s.boundaries == (8, 16, 24)
    assert s.stage_counts(576) == (576, 288, 144, 72)
    assert s.stage_counts(2880) == (2880, 1440, 720, 360)
    assert (s.ranker, s.rank_layer, s.positions) == ("last", "next", "compact")


def test_fastv_defaults() -> None:
    s = DropSchedule.fastv()
    assert s.boundaries == (2,) and s.ratios == (0.5,)
    assert (s.ranker, s.rank_layer, s.positions) == ("last", "stage_last", "keep")
    assert DropSchedule.fastv(K=3, R=0.75).stage_counts(576) == (576, 144)


def test_tokens_per_layer_and_average() -> None:
    s = DropSchedule.pdrop(lam=0.5)
    per_layer = s.tokens_per_layer(576, 32)
    assert per_layer[:8] == [576] * 8 and per_layer[8:16] == [288] * 8 and per_layer[24:] == [72] * 8
    assert s.average_tokens_per_layer(576, 32) == (576 + 288 + 144 + 72) / 4
    d = DropSchedule.drop(layer=16, ratio=0.1)
    assert d.tokens_per_layer(576, 32) == [576] * 16 + [57] * 16


def test_explicit_ratio_list_and_record() -> None:
    s = DropSchedule.pdrop(layers=(4, 12), ratios=(0.6, 0.2), positions="keep")
    assert s.stage_counts(100) == (100, 60, 20)
    rec = s.record()
    assert rec["boundaries"] == [4, 12] and rec["ratios"] == [0.6, 0.2]
    assert rec["positions"] == "keep" and rec["params"] == {"layers": [4, 12], "ratios": [0.6, 0.2]}


def test_vanilla_is_empty() -> None:
    s = DropSchedule.vanilla()
    assert s.is_vanilla and s.stage_counts(576) == (576,)
    assert s.tokens_per_layer(576, 4) == [576] * 4


def test_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="one ratio per boundary"):
        DropSchedule(method="custom", boundaries=(2, 4), ratios=(0.5,))


def test_an_option_left_empty_keeps_the_methods_official_choice() -> None:
    """``None`` (a config key left empty) is the method's official choice, never a value."""
    assert DropSchedule.pdrop(ranker=None, rank_layer=None, positions=None) == DropSchedule.pdrop()
    assert DropSchedule.fastv(positions=None).positions == "keep"
    assert DropSchedule.pdrop(positions=None).positions == "compact"
    assert DropSchedule.pdrop(positions="keep").positions == "keep"
    assert DropSchedule.vanilla(ranker=None) == DropSchedule.vanilla()
