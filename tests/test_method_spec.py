"""One method spec (issue 31): every command takes ``method=<name> method.<field>=<value>`` and turns it
into a schedule with :meth:`DropSchedule.from_spec`; the same overrides give the same schedule everywhere."""

from __future__ import annotations

from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from redundancy import flops, maps, sweep
from redundancy.cli import CONF
from redundancy.lmms.model import schedule_from_args
from redundancy.micro import train
from redundancy.schedule import METHOD_SPECS, DropSchedule, DropSpec, FastVSpec, MethodSpec, PDropSpec

OVERRIDES = {
    "pdrop": {"layers": [4, 12, 20], "lam": 0.4, "positions": "keep", "ranker": "instruction"},
    "fastv": {"K": 3, "R": 0.25, "rank_layer": "next", "positions": "compact"},
    "drop": {"layer": 8, "ratio": 0.3, "ranker": "uniform", "positions": "compact"},
    "vanilla": {"ranker": "instruction", "positions": "keep"},
}


def typed(command: str, overrides: list[str]) -> Any:
    with initialize_config_dir(config_dir=str(CONF / command), version_base=None):
        return OmegaConf.to_object(compose(config_name=command, overrides=overrides))


def _text(value: Any) -> str:
    return "[" + ",".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


@pytest.mark.parametrize("method", list(OVERRIDES))
def test_same_method_overrides_give_the_same_schedule_on_every_command(method: str) -> None:
    line = [f"method={method}", *(f"method.{k}={_text(v)}" for k, v in OVERRIDES[method].items())]
    expected = DropSchedule.from_spec(METHOD_SPECS[method](**OVERRIDES[method]), 32)
    assert expected.record() == {**DropSchedule.from_spec(METHOD_SPECS[method]()).record(), **expected.record()}
    sweep_cfg: sweep.SweepConfig = typed("sweep", line)
    assert sweep.schedules_from_config(sweep_cfg, 32) == [expected]
    flops_cfg: flops.FlopsConfig = typed("flops", line)
    maps_cfg: maps.MapsConfig = typed("maps", line)
    train_cfg: train.TrainConfig = typed("train", line)
    for cfg in (flops_cfg, maps_cfg, train_cfg):
        assert isinstance(cfg.method, METHOD_SPECS[method]), type(cfg).__name__
        assert DropSchedule.from_spec(cfg.method, 32) == expected, type(cfg).__name__
    # the lmms-eval plugin's model_args are flat (key=value list): the same fields, the same schedule
    assert schedule_from_args(method, **OVERRIDES[method]) == expected


def test_the_schedule_follows_the_override() -> None:
    """Not a constant: the overrides reach the schedule (a test of the test above)."""
    low, high = (
        DropSchedule.from_spec(typed("flops", ["method=pdrop", f"method.lam={lam}"]).method) for lam in (0.3, 0.6)
    )
    assert low.ratios[0] == 0.3 and high.ratios[0] == 0.6


def test_from_spec_checks_every_value() -> None:
    with pytest.raises(ValueError, match=r"K=32: boundary 32 is outside the allowed range \[1, 31\]"):
        DropSchedule.from_spec(FastVSpec(K=32), 32)
    with pytest.raises(ValueError, match=r"lam=1.5 is outside the allowed range \[0, 1\]"):
        DropSchedule.from_spec(PDropSpec(lam=1.5))
    with pytest.raises(ValueError, match="is not an integer layer index"):
        DropSchedule.from_spec(DropSpec(layer=[2, 8]))  # lists are the sweep's, expanded before
    with pytest.raises(ValueError, match="does not match its spec"):
        DropSchedule.from_spec(MethodSpec(name="pdrop"))


def test_sweep_still_expands_list_valued_fields() -> None:
    cfg = typed("sweep", ["method=pdrop", "method.lam=[0.4,0.6]", "method.positions=[keep,compact]"])
    points = sweep.schedules_from_config(cfg)
    assert points[0].is_vanilla  # the reference
    assert sorted((p.positions, p.ratios[0]) for p in points[1:]) == [
        ("compact", 0.4), ("compact", 0.6), ("keep", 0.4), ("keep", 0.6)]


SHORT = {"pdrop": ["layers=[4,12,20]", "lam=0.4"], "fastv": ["K=3", "R=0.25"], "drop": ["layer=8", "ratio=0.3"]}


@pytest.mark.parametrize("method", list(SHORT))
def test_shorthands_are_accepted_on_every_command(method: str) -> None:
    """``lam=0.4`` (and ``layer``, ``ratio``, ``K``, ``R``, ``layers``) means ``method.lam=0.4`` on every
    command with a method group, as the sweep's ``layer=16 ratio=0.1``: the same schedule everywhere."""
    from redundancy.cli import expand_shorthands

    line = [f"method={method}", *SHORT[method]]
    spelt = [f"method={method}", *(f"method.{arg}" for arg in SHORT[method])]
    for command in ("flops", "maps", "train"):  # each as its spelt-out form (train's recipe sets its own positions)
        expected = DropSchedule.from_spec(typed(command, spelt).method, 32)
        assert expected != DropSchedule.from_spec(typed(command, [f"method={method}"]).method, 32)
        assert DropSchedule.from_spec(typed(command, expand_shorthands(line, command)).method, 32) == expected
    expected = DropSchedule.from_spec(typed("flops", spelt).method, 32)
    assert sweep.schedules_from_config(typed("sweep", expand_shorthands(line, "sweep")), 32) == [expected]
    assert expand_shorthands(["lam=0.4", "out=x"], "health") == ["lam=0.4", "out=x"]  # no method group
    assert expand_shorthands(["lam=0.4"], "bench") == ["lam=0.4"]  # the bench's own per-method key
