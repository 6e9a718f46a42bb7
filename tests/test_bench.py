"""The bench command runs end to end on tiny shapes and reports sane figures (no timing assertions)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import types
from pathlib import Path
from typing import Any

import pytest
import torch

from redundancy import bench
from redundancy.flops import flops_report
from redundancy.micro.model import MicroConfig, build_micro
from redundancy.micro.train import vocabulary
from redundancy.presets import ModelDims
from tests.helpers import make_batch, tiny_model

TINY = dataclasses.replace(bench.MICRO, num_layers=4, hidden=64, ffn=128, heads=4, kv_heads=2,
                           n_image=16, vision_tokens=17, n_text=8)
# Every method on 4 layers: fastv at 1, pdrop at 1, 2, 3, drop at 2.
FAST = {"methods": ["vanilla", "fastv", "pdrop", "drop"], "K": 1, "layers": [1, 2, 3], "layer": 2, "ratio": 0.5,
        "repeats": 1, "warmup": 0, "new_tokens": 2}


def _run(tmp_path: Path, **overrides: Any) -> tuple[list[str], dict[str, Any]]:
    out = tmp_path / "bench.json"
    text = bench.run(bench.BenchConfig(**{**FAST, **overrides}, out=str(out)))
    return text.splitlines(), json.loads(out.read_text())


def _kv_bytes(dims: ModelDims, row: dict[str, Any], batch: int, element: int) -> int:
    """Keys + values of every layer: 2 * kv_dim bytes per cached token per layer (the FastV peer: FastV's)."""
    sched = bench.schedules_for(bench.BenchConfig(**FAST))[_method(row)]
    tokens = sum(dims.n_text + n for n in sched.tokens_per_layer(dims.n_image, dims.num_layers))
    return batch * 2 * dims.kv_dim * element * tokens


def _method(row: dict[str, Any]) -> str:
    return "fastv" if row["method"] == "fastv_eager" else row["method"]


def test_preset_reports_every_figure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "MICRO", TINY)
    lines, result = _run(tmp_path, batch_size=2)
    assert "4 layers" in lines[0] and "16 image" in lines[0] and "random init" in lines[0]
    assert float(lines[1].rsplit(":", 1)[1]) < 1e-5  # keep ratio 1 == unmodified model
    assert lines[2].split()[:3] == ["method", "prefill", "ms"]
    assert [line.split()[0] for line in lines[3:7]] == FAST["methods"]
    setup, rows = result["setup"], {r["method"]: r for r in result["methods"]}
    assert setup["n_image"] == 16 and setup["n_text"] == 8 and setup["batch_size"] == 2
    dims = dataclasses.replace(TINY, n_image=16, n_text=8)
    for name, row in rows.items():
        assert row["prefill_ms"] > 0 and row["decode_ms_per_token"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["kv_cache_bytes"] == _kv_bytes(dims, row, batch=2, element=4)
        assert row["peak_bytes"] >= row["kv_cache_bytes"]  # the cache is allocated during the run
        assert row["prefill_samples_per_s"] == pytest.approx(2e3 / row["prefill_ms"])
        report = flops_report(dims, bench.schedules_for(bench.BenchConfig(**FAST))[_method(row)])
        assert row["predicted_speedup_lm"] == pytest.approx(1 / report.full_sequence_ratio)
        assert row["percent_of_predicted"] == pytest.approx(100 * row["speedup"] / row["predicted_speedup"])
        if name == "fastv_eager":  # the peer: no separate ranking time, no ideal of its own
            assert row["ranking_ms"] is None and row["ideal_prefill_ms"] is None
            continue
        assert row["ranking_share"] >= 0
        if name == "vanilla":  # its own ideal
            assert row["percent_of_ideal"] == 100 and row["ideal_speedup"] == 1
            continue
        # the ideal ran in the same rounds; the engine is reported against it
        assert row["ideal_prefill_ms"] > 0 and row["ideal_decode_ms_per_token"] > 0
        assert row["percent_of_ideal"] == pytest.approx(100 * row["ideal_prefill_ms"] / row["prefill_ms"])
        assert row["decode_percent_of_ideal"] == pytest.approx(
            100 * row["ideal_decode_ms_per_token"] / row["decode_ms_per_token"])
        assert row["ideal_speedup"] == pytest.approx(rows["vanilla"]["prefill_ms"] / row["ideal_prefill_ms"])
        assert row["rounds"]["ideal_prefill_ms"] == [row["ideal_prefill_ms"]]  # one round: median = the round
    assert [line.split()[0] for line in lines[3:8]] == [*FAST["methods"], "fastv_eager"]
    assert "ideal" in lines[2] and "% of ideal" in lines[2] and any(line.startswith("peers:") for line in lines)
    assert rows["fastv_eager"]["kv_cache_bytes"] == rows["fastv"]["kv_cache_bytes"]
    assert rows["vanilla"]["speedup"] == 1.0 and rows["vanilla"]["predicted_speedup"] == 1.0
    assert rows["vanilla"]["ranking_ms"] == 0.0
    assert rows["pdrop"]["stage_counts"] == [16, 8, 4, 2]
    for name in ("fastv", "pdrop", "drop"):
        assert rows[name]["kv_cache_bytes"] < rows["vanilla"]["kv_cache_bytes"]
        assert rows[name]["predicted_speedup"] > 1 and rows[name]["ranking_gross_ms"] > 0
        assert rows[name]["ranking_ms"] == pytest.approx(rows[name]["ranking_gross_ms"] - rows[name]["reused_ms"])
    # PyramidDrop ranks with layer K's modules (rank_layer=next), whose kept rows layer K reuses;
    # FastV and the single drop rank inside layer K-1's attention call: nothing to reuse.
    assert rows["pdrop"]["reused_ms"] > 0 and rows["fastv"]["reused_ms"] == rows["drop"]["reused_ms"] == 0


def test_ratios_are_medians_of_the_per_round_ratios() -> None:
    """Each ratio pairs the two runs of one round: with the machine three times slower in the
    second round, the engine at 90-99% of its ideal in every round reads as the middle round's
    93.3%, not as the ratio of the two medians (99 / 100 = 99%)."""
    def result(method: str, **rounds: list[float]) -> bench.MethodResult:
        return bench.MethodResult(
            method=method, label=method, stage_counts=[], prefill_ms=0.0, decode_ms_per_token=None, kv_cache_bytes=0,
            peak_bytes=None, prefill_samples_per_s=0.0, prefill_tokens_per_s=0.0, decode_tokens_per_s=None,
            predicted_speedup=2.0, predicted_speedup_lm=2.0, ranking_ms=None, ranking_share=None,
            ranking_gross_ms=None, reused_ms=None, schedule={}, rounds=rounds)

    vanilla = result("vanilla", prefill_ms=[100.0, 300.0, 200.0])
    pdrop = result("pdrop", prefill_ms=[50.0, 150.0, 100.0], ideal_prefill_ms=[45.0, 140.0, 99.0])
    rows = {r.method: r for r in bench.against_vanilla([vanilla, pdrop])}
    assert rows["pdrop"].percent_of_ideal == pytest.approx(100 * 140 / 150)
    assert rows["pdrop"].speedup == pytest.approx(2.0) and rows["pdrop"].percent_of_predicted == pytest.approx(100)
    assert rows["pdrop"].ideal_speedup == pytest.approx(300 / 140)
    assert rows["vanilla"].percent_of_ideal == 100 and rows["pdrop"].decode_speedup is None


def test_rounds_alternate_the_order_of_the_variants(monkeypatch: pytest.MonkeyPatch) -> None:
    """No variant always runs right after the same one: every other round runs them in reverse."""
    seen: list[str] = []
    monkeypatch.setattr(bench, "generate_greedy", lambda *_: bench.Run(0.1, 0.2, 0))
    variants = {name: (lambda name=name: (seen.append(name), contextlib.nullcontext())[1]) for name in "abc"}
    subject = types.SimpleNamespace(model=types.SimpleNamespace(device=torch.device("cpu")), inputs={})
    cfg = bench.BenchConfig(warmup=1, repeats=2, progress=False)
    runs = bench.time_rounds(subject, variants, cfg)  # type: ignore[arg-type]
    assert "".join(seen) == "abccbaabc" and all(len(r) == 2 for r in runs.values())


def test_llava_next_preset_packs_anyres_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tiny_next = dataclasses.replace(TINY, name="llava-next-7b", vision_crops=5)
    monkeypatch.setattr(bench, "preset_dims", lambda name: tiny_next)
    lines, result = _run(tmp_path, preset="llava-next-7b", methods=["vanilla", "pdrop"])
    # base 4x4 grid + 2x2 crops stitched to 8x8 with a newline column: 16 + 8 * 9
    assert result["setup"]["n_image"] == 16 + 72
    assert [r["stage_counts"] for r in result["methods"]] == [[88], [88, 44, 22, 11], [88, 44]]  # + the FastV peer
    assert float(lines[1].rsplit(":", 1)[1]) < 1e-5


def test_trained_model_dir_uses_processor_prompts(tmp_path: Path) -> None:
    shape = MicroConfig(layers=4, hidden=32, heads=2, kv_heads=2, ffn=64, image_size=48, patch=8,
                        vision_layers=1, vision_hidden=32, vision_heads=2, vision_ffn=64)
    model, processor = build_micro(shape, vocabulary(shape))
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    out = tmp_path / "bench.csv"
    text = bench.run(bench.BenchConfig(**{**FAST, "new_tokens": 0}, checkpoint=str(tmp_path / "model"), batch_size=3,
                                       out=str(out)))
    assert "(trained)" in text.splitlines()[0] and "36 image" in text.splitlines()[0]
    rows = list(csv.DictReader(out.open()))
    assert [r["method"] for r in rows] == [*FAST["methods"], "fastv_eager"]
    assert all(r["decode_ms_per_token"] == "" and r["batch_size"] == "3" for r in rows)
    assert json.loads(rows[2]["stage_counts"]) == [36, 18, 9, 4]


def test_padded_batch_runs_no_reference() -> None:
    """The ideal and the peers need a padding-free batch; a left-padded one gets the engine only and a note."""
    model = tiny_model("llava", "llama", "sdpa")
    subject = bench.Subject(model, make_batch(model, [(3, 5), (1, 3)]), bench.MICRO, "random init")
    schedules = bench.schedules_for(bench.BenchConfig(**FAST))
    timed, note = bench.variants(subject, schedules, bench.BenchConfig(**FAST))
    assert list(timed) == FAST["methods"] and "ideal and peers not run" in note and "padding" in note


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"checkpoint": "llava-1.5-7b"}, "use preset=llava-1.5-7b"),
        ({"preset": "llava-2"}, "not a known preset"),
        ({"methods": ["fastvv"]}, "method='fastvv'"),
        ({"out": "bench.txt"}, "must end in .json or .csv"),
        ({"dtype": "fp8"}, "dtype='fp8'"),
        ({"layers": [8, 16, 24]}, "boundary 8 is outside"),
        ({"peers": ["fastv_lazy"]}, "peers: 'fastv_lazy' is unknown"),
    ],
)
def test_bad_input_is_named(overrides: dict[str, Any], message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bench, "MICRO", TINY)
    with pytest.raises(ValueError, match=message):
        bench.run(bench.BenchConfig(**{**FAST, **overrides}))


def test_cache_bytes_counts_every_stage() -> None:
    cache = type("Cache", (), {})()
    layer = type("Layer", (), {})
    cache.layers = [layer(), layer()]
    cache.layers[0].keys = cache.layers[0].values = torch.zeros(1, 2, 10, 4)
    cache.layers[1].keys = cache.layers[1].values = torch.zeros(1, 2, 3, 4, dtype=torch.bfloat16)
    assert bench.cache_bytes(cache) == 2 * 80 * 4 + 2 * 24 * 2


def test_micro_shape_is_consistent() -> None:
    assert isinstance(bench.MICRO, ModelDims)
    assert bench.MICRO.vision_patches == bench.MICRO.n_image == 576


def test_cpu_sized_llava15_stand_in_has_the_issue_shape() -> None:
    """The CPU-sized LLaVA-1.5 (issue 32's second bench shape): hidden >= 1024, 576 image tokens,
    LLaVA-1.5's depth, and a preset name the bench resolves (an unknown one lists it)."""
    dims = bench.preset_dims("llava-1.5-cpu")
    assert dims.hidden >= 1024 and dims.n_image == 576 and dims.num_layers == 32
    with pytest.raises(ValueError, match="llava-1.5-cpu"):
        bench.preset_dims("llava-1.5-gpu")
