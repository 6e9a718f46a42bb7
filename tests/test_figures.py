"""Figures and tables from a small synthetic results store (redundancy/plots, redundancy/figures.py):
axes, legend entries, files written, and what is reported when inputs are missing."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from redundancy import figures
from redundancy.plots import (
    MapRecord,
    MissingInput,
    NothingToDraw,
    attention_figure,
    attention_layers_figure,
    flops_tradeoff_figure,
    inference_table,
    lambda_table,
    latest,
    layer_ratio_figure,
    load_maps,
    markdown,
    retained_figure,
    save_figure,
    trained_figure,
    training_table,
    write_table,
)
from redundancy.plots.records import Question, evidence_share, save_maps
from redundancy.results import ResultStore, load_results, load_samples
from redundancy.schedule import DropSchedule
from redundancy.stats import confidence_interval

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("color", "count")
PER_FAMILY = 20  # questions per family in every synthetic point
N_IMAGE, DEPTH, VANILLA_TFLOPS = 144, 32, 1e-3
LAYERS = (2, 8, 16, 24)
RATIOS = (0.0, 0.5, 1.0)
SEEDS = 3  # seeds of the random control


# ------------------------------------------------------------------ a synthetic store
def label(schedule: DropSchedule) -> str:
    """The sweep's point label (redundancy.sweep.label) without importing the sweep."""
    return f"{schedule.method} {' '.join(f'{k}={v}' for k, v in schedule.params.items())}".strip()


def add_point(store: ResultStore, model: str, schedule: DropSchedule, quality: float, n_scale: int = 1) -> None:
    """One point whose accuracy in family ``f`` is ``quality`` shifted per family (exact 0/1 scores)."""
    key = f"{abs(hash((model, json.dumps(schedule.record(), sort_keys=True), n_scale))):016x}"[:16]
    records, per_family = [], {}
    for f, family in enumerate(FAMILIES):
        n = PER_FAMILY * n_scale
        correct = round(n * min(1.0, max(0.0, quality - 0.2 * f)))
        per_family[family] = correct / n
        records += [{"question_id": f"{family}-{i}", "family": family, "score": float(i < correct)} for i in range(n)]
    scores = [r["score"] for r in records]
    low, high, _ = confidence_interval(scores)
    tokens = schedule.average_tokens_per_layer(N_IMAGE, DEPTH) if not schedule.is_vanilla else N_IMAGE
    first = schedule.boundaries[0] if schedule.boundaries else None
    row = {
        "key": key, "created": "2026-01-01T00:00:00+00:00", "point": label(schedule), "model": model,
        "data": "microvqa", "metric": "exact", "method": schedule.method, "params": schedule.params,
        "layer": first if schedule.method in ("drop", "fastv") else None,
        "ratio": schedule.ratios[0] if schedule.method in ("drop", "fastv") else None,
        "boundaries": list(schedule.boundaries), "ratios": list(schedule.ratios), "ranker": schedule.ranker,
        "rank_layer": schedule.rank_layer, "positions": schedule.positions, "seed": 0,
        "accuracy": sum(scores) / len(scores), "ci_low": low, "ci_high": high, "ci_level": 0.95, "n": len(scores),
        "per_family": per_family, "image_tflops": VANILLA_TFLOPS * tokens / N_IMAGE,
        "full_tflops": VANILLA_TFLOPS * (tokens + 10) / N_IMAGE, "avg_image_tokens": tokens,
        "flops_convention": "eq4: synthetic", "prefill_ms": 5.0 + tokens / 10,
        "prefill_vanilla_ms": 50.0, "prefill_speedup": 50.0 / (5.0 + tokens / 10), "prefill_batch": 1,
        "device": "cpu", "accelerator": None,
    }
    store.finish(key, row, records)


def make_store(root: Path, vanilla: str, pdrop: str, *, control: bool = True) -> Path:
    store = ResultStore(root)
    for model, bonus in ((vanilla, 0.0), (pdrop, 0.05)):
        add_point(store, model, DropSchedule.vanilla(), 0.8 + bonus)
        for k in LAYERS:
            for r in RATIOS:
                add_point(store, model, DropSchedule.drop(k, r), 0.3 + 0.5 * r + k / 100 + bonus)
                for seed in range(SEEDS if control and model == vanilla else 0):
                    random = DropSchedule.drop(k, r, ranker="random").seeded("ckpt", seed)
                    add_point(store, model, random, 0.25 + 0.5 * r + 0.05 * seed)
    for R in (0.5, 0.75):
        add_point(store, vanilla, DropSchedule.fastv(R=R), 0.8 - 0.4 * R)
    for lam in (0.4, 0.5, 0.6):
        add_point(store, vanilla, DropSchedule.pdrop(lam=lam), 0.5 + 0.4 * lam)
        for seed in range(SEEDS if control else 0):  # Fig. 4's random control
            add_point(
                store, vanilla, DropSchedule.pdrop(lam=lam, ranker="random").seeded("ckpt", seed), 0.4 + 0.05 * seed
            )
    add_point(store, vanilla, DropSchedule.fastv(R=0.5, positions="compact"), 0.5)  # Fig. 4's other position policy
    add_point(store, vanilla, DropSchedule.drop(8, 0.5, positions="compact"), 0.0)  # a variant: never drawn
    return root


def write_card(folder: Path, name: str, wall: dict[str, float], acc: float, init_from: str | None = None,
               start_stage: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    card = {"name": name, "train_config": {"method": "pdrop" if init_from else "vanilla", "init_from": init_from,
                                           "start_stage": start_stage},
            "training_wall_s": wall, "train_device": "cpu", "train_threads": 2, "test_set": "test",
            "test_accuracy": {"accuracy": acc, "n": 40, "per_family": {"color": acc, "count": acc / 2}}}
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Models named by their checkpoint directories (holding card.json), as with ``model.path=<dir>``."""
    root = tmp_path_factory.mktemp("results")
    vanilla = str(write_card(root / "ckpt" / "m-vanilla", "m-vanilla", {"a": 600.0, "final": 120.0}, 0.8))
    pdrop = str(write_card(root / "ckpt" / "m-pdrop", "m-pdrop", {"a": 600.0, "final": 60.0}, 0.85,
                           init_from="m-vanilla/a", start_stage="final"))
    make_store(root / "sweep", vanilla, pdrop)
    save_maps(synthetic_record(), root / "maps" / "m-vanilla.npz")
    return {"root": root, "vanilla": vanilla, "pdrop": pdrop, "rows": load_results(root / "sweep"),
            "samples": load_samples(root / "sweep")}


def legend_labels(fig: Any) -> list[str]:
    """The figure's one legend (below the panels or in the grid's unused slot)."""
    (legend,) = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [t.get_text() for t in legend.get_texts()]


def panels(fig: Any) -> list[Any]:
    """The axes that hold data (not the legend's slot or blank ones)."""
    return [ax for ax in fig.axes if ax.axison]


# ------------------------------------------------------------------ Fig. 1a, 3, 4
def test_layer_ratio_figure(world: dict[str, Any], tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", MissingInput)  # complete inputs: nothing reported missing
        fig = layer_ratio_figure(world["rows"], world["samples"], model=world["vanilla"])
    assert [ax.get_title() for ax in panels(fig)] == ["overall (n=40)", "color (n=20)", "count (n=20)"]
    assert fig.axes[0].get_ylabel() == "accuracy (%)"
    assert legend_labels(fig) == [
        "drop at layer 2", "drop at layer 8", "drop at layer 16", "drop at layer 24",
        "ranked by attention (last)", f"random control (mean of {SEEDS} seeds)", "no drop (vanilla)",
    ]
    for ax in panels(fig):
        lines = [line for line in ax.get_lines() if len(line.get_xdata()) == len(RATIOS)]
        assert len(lines) == 2 * len(LAYERS)  # attention + control per layer (the compact variant stays out)
        assert sum(line.get_linestyle() == "--" for line in lines) == len(LAYERS)  # the seeds: one mean line
        assert ax.collections  # confidence bands, per family from the per-sample records
    top = fig.axes[0].get_lines()[0]
    assert np.allclose(top.get_xdata(), RATIOS)
    control = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"][0]
    # overall accuracy q - 0.1 (the count family is 0.2 lower) at r=0, q = 0.25, 0.30, 0.35 over the seeds
    assert control.get_ydata()[0] == pytest.approx(100 * (0.30 - 0.1))
    paths = save_figure(fig, "fig1a", tmp_path)
    assert [p.name for p in paths] == ["fig1a.pdf", "fig1a.png"]
    assert paths[0].read_bytes().startswith(b"%PDF") and paths[1].stat().st_size > 0


def test_missing_control_and_records_are_reported(world: dict[str, Any]) -> None:
    rows = world["rows"][world["rows"]["ranker"] != "random"]
    with pytest.warns(MissingInput) as caught:
        fig = layer_ratio_figure(rows, None, model=world["vanilla"], layers=(2, 8))
    messages = " | ".join(str(w.message) for w in caught)
    assert "ranker=random" in messages and "without confidence bands" in messages
    expected = ["drop at layer 2", "drop at layer 8", "ranked by attention (last)", "no drop (vanilla)"]
    assert legend_labels(fig) == expected  # no entry for the absent control
    assert not panels(fig)[1].collections  # no per-family band without per-sample records


def test_trained_figure(world: dict[str, Any]) -> None:
    models = {"vanilla-trained": world["vanilla"], "PyramidDrop-trained": world["pdrop"]}
    fig = trained_figure(world["rows"], models)
    assert len(fig.axes) == 2 * len(LAYERS)
    assert [ax.get_title() for ax in fig.axes[: len(LAYERS)]] == [f"drop at layer {k}" for k in LAYERS]
    assert legend_labels(fig) == ["vanilla-trained", "PyramidDrop-trained",
                                  f"random control (mean of {SEEDS} seeds), bottom row", "no drop (same checkpoint)"]
    delta = fig.axes[len(LAYERS)].get_lines()[0].get_ydata()
    assert delta[-1] == pytest.approx(100 * (0.3 + 0.5 + 0.02 - 0.8) / 2, abs=3)  # change from no drop, points
    (control,) = [line for line in fig.axes[len(LAYERS)].get_lines() if line.get_linestyle() == "--"]
    # the vanilla-trained model's control (the only one recorded) at r=0: seeds' mean 0.20 against vanilla 0.70
    assert control.get_ydata()[0] == pytest.approx(100 * (0.20 - 0.70))
    with pytest.warns(MissingInput, match="absent"):
        fig = trained_figure(world["rows"], {**models, "other": "absent"})
    assert legend_labels(fig)[:2] == ["vanilla-trained", "PyramidDrop-trained"]
    with pytest.warns(MissingInput, match="at layer 24"):
        fig = trained_figure(world["rows"][world["rows"]["layer"] != 24], models)
    assert [t.get_text() for t in fig.axes[len(LAYERS) - 1].texts] == ["no drop rows\nat layer 24"]


def test_flops_tradeoff_figure(world: dict[str, Any]) -> None:
    fig = flops_tradeoff_figure(world["rows"], world["samples"], model=world["vanilla"], budgets=(0.3, 0.5))
    assert len(panels(fig)) == 1 + len(FAMILIES)
    assert legend_labels(fig) == ["FastV (K=2)", "PyramidDrop (layers 8, 16, 24)",
                                  f"random control (mean of {SEEDS} seeds)", "other position policy (keep / compact)",
                                  "no drop (vanilla)", "FLOPs budgets"]
    assert "GFLOPs" in fig.get_supxlabel()
    ax = fig.axes[0]
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-" and line.get_marker() == "o"]
    fastv, pdrop = solid
    assert len(fastv.get_xdata()) == 2 and len(pdrop.get_xdata()) == 3
    assert np.all(np.diff(pdrop.get_xdata()) > 0)  # sorted by cost
    (control,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]  # PyramidDrop's, seeds averaged
    assert len(control.get_xdata()) == 3 and control.get_ydata()[0] == pytest.approx(100 * (0.45 - 0.1))
    (other,) = [line for line in ax.get_lines() if line.get_linestyle() == "-."]  # FastV with compact positions
    assert len(other.get_xdata()) == 1
    budgets = [
        line for line in ax.get_lines() if len(line.get_xdata()) == 2 and line.get_xdata()[0] == line.get_xdata()[1]
    ]
    assert sorted(line.get_xdata()[0] for line in budgets) == pytest.approx([0.3, 0.5])  # x in GFLOPs, vanilla = 1


def test_figures_read_at_page_width(world: dict[str, Any]) -> None:
    """Every figure at most a page wide and no strip, every text at least 7 pt at that size, and the four
    layers in four distinct colours of the colour-blind-safe palette."""
    from matplotlib.colors import to_hex
    from matplotlib.text import Text

    from redundancy.plots.style import MIN_FONT, OKABE_ITO, PAGE_WIDTH

    models = {"vanilla-trained": world["vanilla"], "PyramidDrop-trained": world["pdrop"]}
    record = synthetic_record()
    drawn = [layer_ratio_figure(world["rows"], world["samples"], model=world["vanilla"]),
             trained_figure(world["rows"], models),
             flops_tradeoff_figure(world["rows"], world["samples"], model=world["vanilla"], budgets=(0.5,)),
             attention_figure(record, layers=(1, 4)), attention_layers_figure(record, question=0),
             retained_figure(record)]
    for fig in drawn:
        width, height = fig.get_size_inches()
        assert width <= PAGE_WIDTH + 1e-9 and height / width >= 0.4, (width, height)
        texts = [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]
        assert min(t.get_fontsize() for t in texts) >= MIN_FONT
    colours = {line.get_label(): to_hex(line.get_color()) for line in drawn[0].axes[0].get_lines()
               if line.get_label().startswith("layer ")}
    assert len(set(colours.values())) == len(LAYERS) and set(colours.values()) <= {c.lower() for c in OKABE_ITO}


def test_an_empty_map_is_explained() -> None:
    record = synthetic_record()
    record.attention[0, 3] = 0.0  # layer 3 recorded no attention on the image (sums to 0)
    fig = attention_layers_figure(record, question=0, cols=3)
    captions = [ax.get_xlabel() for ax in fig.axes if ax.get_visible()]
    assert "no attention on" in captions[3] and "% on object" in captions[2]


def test_nothing_to_draw_and_model_choice(world: dict[str, Any]) -> None:
    with pytest.raises(NothingToDraw):
        layer_ratio_figure(pd.DataFrame())
    with pytest.raises(NothingToDraw, match="no rows for model"):
        layer_ratio_figure(world["rows"], model="nobody")
    with pytest.raises(ValueError, match="several models"):
        layer_ratio_figure(world["rows"])
    fastv_only = world["rows"][world["rows"]["method"].isin(["vanilla", "drop"])]
    with pytest.raises(NothingToDraw, match="fig4"):
        flops_tradeoff_figure(fastv_only, model=world["vanilla"])


def test_latest_keeps_the_largest_evaluation_and_refuses_smaller_ones(tmp_path: Path) -> None:
    """A trial on a few questions (data.limit) is neither drawn over the full point nor beside it."""
    store = ResultStore(tmp_path)
    add_point(store, "m", DropSchedule.drop(2, 0.5), 0.5, n_scale=1)
    add_point(store, "m", DropSchedule.drop(2, 0.5), 0.7, n_scale=3)
    add_point(store, "m", DropSchedule.drop(8, 0.5), 0.5, n_scale=1)
    with pytest.warns(MissingInput, match=r"refused 1 rows evaluated on n=\[40\] questions, not the panel's n=120"):
        rows = latest(load_results(tmp_path))
    assert list(rows["n"]) == [120] and list(rows["point"]) == ["drop layer=2 ratio=0.5"]


# ------------------------------------------------------------------ tables
def test_inference_and_lambda_tables(world: dict[str, Any], tmp_path: Path) -> None:
    table = inference_table(world["rows"], world["samples"], model=world["vanilla"])
    assert list(table.frame["method"]) == ["vanilla", "fastv K=2 R=0.5", "pdrop layers=[8, 16, 24] lam=0.5"]
    # paired against vanilla (redundancy.stats): quality 0.8 - 0.4 R = 0.6 (FastV) and 0.5 + 0.4 lam = 0.7
    # (PyramidDrop) against vanilla's 0.8, right answers nested in vanilla's: -20 and -10 points
    assert list(table.frame["vs vanilla (points)"]) == ["-", "-20.0", "-10.0"]
    # 8 of 40 answers lost, none gained: exact McNemar p = 2 / 2**8, Holm over the two rows: x2
    assert table.frame["Holm p"].iloc[1] == f"{2 * 2 / 2**8:.2g}" and any("Holm" in note for note in table.notes)
    assert "Holm p" not in inference_table(world["rows"], model=world["vanilla"]).frame  # no per-sample records
    for name in ("image TFLOPs", "vs vanilla", "prefill ms", "prefill speedup", "accuracy %", "color %", "count %",
                 "n"):
        assert name in table.frame
    assert list(table.frame["prefill speedup"]) == pytest.approx(list(50.0 / table.frame["prefill ms"]))
    assert list(table.frame["vanilla ms, same rounds"]) == [50.0] * 3
    assert any("prefill speedup" in note for note in table.notes)
    assert table.frame["vs vanilla"].iloc[0] == pytest.approx(1.0)
    assert table.frame["accuracy %"].iloc[0] == pytest.approx(100 * (0.8 + 0.6) / 2)
    assert any("prefill ms" in note for note in table.notes)
    text = markdown(table)
    assert text.startswith("### Inference comparison") and "| vanilla | 0.001 | 1.00 |" in text
    md, csv = write_table(table, "table5", tmp_path)
    assert md.read_text() == text and pd.read_csv(csv).shape == table.frame.shape

    lam = lambda_table(world["rows"], model=world["vanilla"])
    assert list(lam.frame["lambda"].fillna(-1)) == [-1, 0.4, 0.5, 0.6]
    costs = list(lam.frame["image TFLOPs"])
    assert costs[0] == max(costs) and costs[1:] == sorted(costs[1:])  # vanilla, then cost grows with lambda
    with pytest.warns(MissingInput, match="lam=0.9"):
        lambda_table(world["rows"], model=world["vanilla"], lambdas=(0.5, 0.9))


def test_training_table(world: dict[str, Any]) -> None:
    table = training_table([world["vanilla"], world["pdrop"]])
    frame = table.frame
    assert list(frame["checkpoint"]) == ["m-vanilla", "m-pdrop"]
    assert list(frame["stages trained"]) == ["a final", "final"]
    assert list(frame["wall min (these stages)"]) == pytest.approx([12.0, 1.0])
    assert list(frame["wall min (all stages)"]) == pytest.approx([12.0, 11.0])
    assert list(frame["started from"]) == ["scratch", "m-vanilla/a"]
    assert list(frame["accuracy %"]) == pytest.approx([80.0, 85.0])


# ------------------------------------------------------------------ attention maps and kept tokens
def synthetic_record(grid: int = 4, layers: int = 6) -> MapRecord:
    rng = np.random.default_rng(0)
    n = grid * grid
    attention = rng.random((2, layers, n)).astype(np.float32)
    attention /= attention.sum(-1, keepdims=True) * 2  # half the attention on image tokens
    schedule = DropSchedule.pdrop(layers=(2, 4), lam=0.5)
    kept = np.zeros((2, 2, n), bool)
    kept[:, 0, : n // 2] = True
    kept[:, 1, : n // 4] = True
    questions = [Question(f"q{i}", f"What is {i}?", ["a"], "color", "a", "b", evidence=[0, 1, grid]) for i in range(2)]
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    return MapRecord(model="m-vanilla", checkpoint_id="abc", grid=grid, num_layers=layers, query="last",
                     layers=list(range(layers)), schedule=schedule.record(), questions=questions, images=images,
                     attention=attention, kept=kept)


def test_map_record_round_trip(tmp_path: Path) -> None:
    record = synthetic_record()
    back = load_maps(save_maps(record, tmp_path / "m.npz"))
    assert back.questions == record.questions and back.boundaries == [2, 4] and back.num_layers == 6
    assert np.allclose(back.attention, record.attention, rtol=1e-3)  # stored as float16
    assert np.array_equal(back.kept, record.kept)
    assert all(np.array_equal(a, b) for a, b in zip(back.images, record.images))
    assert back.kept_at(0, 0).all() and back.kept_at(0, 2).sum() == 4
    assert evidence_share(np.ones(16), [0, 1, 2, 3]) == pytest.approx(0.25)
    assert np.isnan(evidence_share(np.ones(16), []))
    with pytest.raises(ValueError, match="attention has shape"):
        MapRecord(**{**record.__dict__, "attention": record.attention[:, :3]})


def test_attention_and_retained_figures() -> None:
    record = synthetic_record()
    fig = attention_figure(record, layers=(1, 4))
    assert len(fig.axes) == 2 * 3
    assert [ax.get_title() for ax in fig.axes[1:3]] == ["layer 1", "layer 4"]
    assert "% on object" in fig.axes[1].get_xlabel()
    fig = attention_layers_figure(record, question=1, cols=4)
    assert [ax.get_title() for ax in fig.axes if ax.get_visible()] == [f"layer {k}" for k in range(6)]
    fig = retained_figure(record)
    assert [ax.get_title() for ax in fig.axes[1:3]] == ["layers 2-3: 8 kept", "layers 4-5: 4 kept"]
    assert [ax.get_xlabel() for ax in fig.axes[1:3]] == ["3/3 object tokens kept", "2/3 object tokens kept"]
    with pytest.warns(MissingInput, match=r"layers \[9\] were not recorded"):
        fig = attention_figure(record, layers=(1, 9))
    assert len(fig.axes) == 2 * 2
    with pytest.raises(NothingToDraw), pytest.warns(MissingInput):
        attention_figure(record, layers=(9,))


# ------------------------------------------------------------------ the entry point
def test_figures_command_rebuilds_everything(world: dict[str, Any]) -> None:
    root = world["root"]
    trained = f"trained=[{world['vanilla']},{world['pdrop']}]"
    cfg = figures.config(f"results={root}", f"model={world['vanilla']}", trained, "map_layers=[1,4]", "budgets=[0.5]",
                         "every_layer=false", "dpi=40")
    report = figures.run(cfg)
    for name in ("fig1a_layer_ratio", "fig3_trained", "fig4_flops_tradeoff", "fig1b_attention_m-vanilla",
                 "fig5_retained_m-vanilla"):
        assert (root / "figures" / f"{name}.pdf").is_file() and (root / "figures" / f"{name}.png").is_file(), report
    for name in ("table5_inference", "table4_lambda", "table_training"):
        assert (root / "tables" / f"{name}.md").is_file() and (root / "tables" / f"{name}.csv").is_file(), report
    assert (
        f"claims: {root / 'claims'}.{{md}}" in report and "| 11 | Training cost |" in (root / "claims.md").read_text()
    )
    blocks = re.split(r"\n(?! )", report)  # one per output: its line and its indented `missing` lines
    others = [b for b in blocks if not b.startswith("fig_rankers")]
    assert not any("skipped" in b or "missing" in b for b in others)
    assert "fig_rankers_kept_layer2: skipped (no spatial counts" in report  # no rankers study in these rows


def test_figures_command_says_what_is_missing(tmp_path: Path) -> None:
    make_store(tmp_path / "sweep", "v", "p", control=False)
    report = figures.run(figures.config(f"results={tmp_path}", "model=v", "trained=[v,nowhere]", "formats=[pdf]"))
    assert "missing: fig1: no control rows (ranker=random) at layer 2" in report
    assert "missing: fig3: no rows for PyramidDrop-trained (nowhere)" in report
    assert "fig1b / fig5: skipped (no attention-map artefacts" in report
    assert (tmp_path / "figures" / "fig1a_layer_ratio.pdf").is_file()


def test_fig4_experiments_meet_the_budgets() -> None:
    """conf/sweep/experiment/fig4_*.yaml hold the R and lam that redundancy.flops solves for
    redundancy/conf/figures/figures.yaml's budgets."""
    from transformers import AutoConfig

    from redundancy.flops import TERA, fastv_ratio_for_budget, image_part_flops, pdrop_lambda_for_budget
    from redundancy.loading import resolve
    from redundancy.presets import ModelDims

    dims = ModelDims.from_hf_config(AutoConfig.from_pretrained(resolve("micro-llava-vanilla")), n_image=N_IMAGE)
    full = image_part_flops(dims, DropSchedule.vanilla()) / TERA
    budgets = figures.config().budgets
    fastv, pdrop = (OmegaConf.load(next((ROOT / "redundancy" / "conf").rglob(f"experiment/{name}.yaml"))).method
                    for name in ("fig4_fastv", "fig4_pdrop"))
    assert list(fastv.R) == [fastv_ratio_for_budget(dims, b * full, K=fastv.K) for b in budgets]
    assert list(pdrop.lam) == [pdrop_lambda_for_budget(dims, b * full, layers=pdrop.layers) for b in budgets]
