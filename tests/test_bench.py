"""The bench command runs end to end on a small shape and reports measured figures."""

from __future__ import annotations

import dataclasses

import pytest

from redundancy import bench
from redundancy.presets import ModelDims


def test_bench_runs_and_reports(monkeypatch: pytest.MonkeyPatch) -> None:
    small = dataclasses.replace(bench.MICRO, num_layers=4, hidden=64, ffn=128, heads=4, kv_heads=4,
                                n_image=16, vision_tokens=17, n_text=8)
    monkeypatch.setattr(bench, "MICRO", small)
    cfg = bench.BenchConfig(methods=["vanilla", "drop"], layer=2, ratio=0.5, repeats=2, warmup=1)
    out = bench.run(cfg)
    lines = out.splitlines()
    assert "4 layers" in lines[0] and "16 image" in lines[0]
    diff = float(lines[1].rsplit(":", 1)[1])
    assert diff < 1e-5
    drop_line = next(line for line in lines if line.startswith("drop"))
    assert float(drop_line.split()[-1].rstrip("%")) >= 0.0


def test_unknown_method_named() -> None:
    with pytest.raises(ValueError, match="method='fastvv'"):
        bench.schedule_for("fastvv", 2, 0.5)


def test_micro_shape_is_consistent() -> None:
    assert isinstance(bench.MICRO, ModelDims)
    assert bench.MICRO.vision_patches == bench.MICRO.n_image == 576
