"""Rebuild every figure and table of the study from recorded results; nothing is recomputed.

    python -m redundancy.figures                  # results/sweep, results/maps -> results/figures, results/tables
    python -m redundancy.figures results=<dir>    # another results folder

Inputs: the sweep's rows (``store``, by default ``<results>/sweep``; :func:`redundancy.results.load_results`;
the studies' commands are the header comments of ``conf/sweep/experiment/fig*.yaml`` / ``table*.yaml``), the
attention-map artefacts (``<results>/maps/*.npz``, ``python -m redundancy.maps``) and the shipped
checkpoints' cards. Figures are written as PDF (vector) and PNG (preview), tables as Markdown and CSV.
What a figure needs but the results lack is listed as ``missing``; a figure with no rows at all is
``skipped``. The paper's claims with their verdicts go to ``<results>/claims.md`` (:mod:`redundancy.claims`).
Settings: ``redundancy/conf/figures/figures.yaml``.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import matplotlib
import pandas as pd
from hydra.core.config_store import ConfigStore
from matplotlib.figure import Figure
from omegaconf import DictConfig
from tqdm.auto import tqdm

from redundancy import claims
from redundancy.cli import CONF, launch, run_entry
from redundancy.plots import curves, images, spatial, tables
from redundancy.plots.forest import claim_figure
from redundancy.plots.frames import MissingInput, NothingToDraw
from redundancy.plots.records import MapRecord, load_all_maps
from redundancy.plots.style import save_figure
from redundancy.results import load_results, load_samples
from redundancy.validate import check_writable


@dataclass
class FiguresConfig:
    results: str = "results"
    store: str = "${results}/sweep"
    maps: str = "${results}/maps"
    figures: str = "${results}/figures"
    tables: str = "${results}/tables"
    data: str = "microvqa"
    model: str = "micro-llava-vanilla"
    trained: list[str] = field(default_factory=lambda: ["micro-llava-vanilla", "micro-llava-pdrop"])
    trained_labels: list[str] = field(default_factory=lambda: ["vanilla-trained", "PyramidDrop-trained"])
    layers: list[int] = field(default_factory=lambda: [2, 8, 16, 24])
    ranker: str = "last"
    control: str | None = "random"
    fastv_K: int = 2
    pdrop_layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    budgets: list[float] = field(default_factory=lambda: [0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    inference: list[str] = field(default_factory=lambda: list(tables.INFERENCE_POINTS))
    lambdas: list[float] = field(default_factory=lambda: list(tables.LAMBDAS))
    map_layers: list[int] = field(default_factory=lambda: [2, 16])
    map_rows: int = 4  # questions drawn in Fig. 1b and Fig. 5 (one per family first); the claims use all recorded
    rankers: list[str] = field(default_factory=lambda: list(spatial.RANKERS))  # the rankers study, in drawing order
    rankers_ratio: float = 0.1  # the rankers study's figures and critique claims: this keep ratio
    rankers_layers: list[int] = field(default_factory=lambda: [2, 16])  # ... these drop layers
    every_layer: bool = True
    samples: bool = True
    formats: list[str] = field(default_factory=lambda: ["pdf", "png"])
    dpi: int = 150
    claims: str = "${results}/claims.md"  # written: the paper's claims with verdicts (redundancy.claims)
    progress: bool = True  # a progress bar over the figures and tables (stderr)


ConfigStore.instance().store(name="figures_schema", node=FiguresConfig)


def config(*overrides: str) -> FiguresConfig:
    """``redundancy/conf/figures/figures.yaml`` with ``overrides`` (e.g. ``"results=../results"``), as the
    typed config; the notebooks read their settings this way."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(CONF / "figures"), version_base=None):
        cfg = compose(config_name="figures", overrides=list(overrides))
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


Draw = Callable[[], Figure]  # draws one figure
Job = Callable[[], list[Path]]  # draws and writes one figure or table; returns its files


@dataclass
class Output:
    """What one figure or table produced: its files, or why it was skipped, and what it lacked."""

    name: str
    files: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped: str | None = None


def build(name: str, make: Job) -> Output:
    """Run ``make``, collecting :class:`MissingInput` warnings; :class:`NothingToDraw` skips it."""
    out = Output(name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", MissingInput)
        try:
            out.files = make()
        except NothingToDraw as err:
            out.skipped = str(err)
    out.missing = list(dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, MissingInput)))
    return out


def trained_models(cfg: FiguresConfig) -> dict[str, str]:
    """Fig. 3's legend label -> model."""
    if len(cfg.trained) != len(cfg.trained_labels):
        raise ValueError(f"trained={cfg.trained} and trained_labels={cfg.trained_labels} differ in length")
    return dict(zip(cfg.trained_labels, cfg.trained))


def result_figures(cfg: FiguresConfig, rows: pd.DataFrame, samples: pd.DataFrame | None) -> dict[str, Draw]:
    """The figures drawn from result rows, by file name."""
    one: dict[str, Any] = {"model": cfg.model, "data": cfg.data, "ranker": cfg.ranker}
    study: dict[str, Any] = {"ratio": cfg.rankers_ratio, "data": cfg.data, "rankers": cfg.rankers}
    kept = {f"fig_rankers_kept_layer{k}": lambda k=k: spatial.kept_heatmap_figure(rows, cfg.model, k, **study)
            for k in cfg.layers}
    return {
        **kept,
        "fig_rankers_accuracy": lambda: spatial.ranker_accuracy_figure(rows, cfg.trained, cfg.rankers_layers, **study),
        "fig1a_layer_ratio": lambda: curves.layer_ratio_figure(
            rows, samples, layers=cfg.layers, control=cfg.control, **one),
        "fig3_trained": lambda: curves.trained_figure(
            rows, trained_models(cfg), data=cfg.data, layers=cfg.layers, ranker=cfg.ranker, control=cfg.control),
        "fig4_flops_tradeoff": lambda: curves.flops_tradeoff_figure(
            rows, samples, K=cfg.fastv_K, layers=cfg.pdrop_layers, budgets=cfg.budgets, control=cfg.control, **one),
    }


def result_tables(cfg: FiguresConfig, rows: pd.DataFrame,
                  samples: pd.DataFrame | None = None) -> dict[str, Callable[[], tables.Table]]:
    """The tables drawn from result rows (paired tests from the per-sample records ``samples``, when
    given; and the checkpoints' cards), by file name."""
    one = {"model": cfg.model, "data": cfg.data, "ranker": cfg.ranker}
    return {
        "table5_inference": lambda: tables.inference_table(rows, samples, points=cfg.inference, **one),
        "table4_lambda": lambda: tables.lambda_table(rows, samples, lambdas=cfg.lambdas, layers=cfg.pdrop_layers,
                                                     **one),
        "table_training": lambda: tables.training_table(cfg.trained),
    }


def page_rows(record: MapRecord, rows: int) -> list[int]:
    """The recorded questions a page-sized map figure draws: the first of each family, then the
    others in order, ``rows`` in all."""
    firsts, seen = [], set()
    for i, q in enumerate(record.questions):
        if q.family not in seen:
            seen.add(q.family)
            firsts.append(i)
    rest = [i for i in range(len(record.questions)) if i not in firsts]
    return sorted((firsts + rest)[: max(1, rows)])


def map_figures(cfg: FiguresConfig, tag: str, record: MapRecord) -> dict[str, Draw]:
    """The figures drawn from one attention-map artefact (``<tag>.npz``), by file name."""
    out: dict[str, Draw] = {
        f"fig1b_attention_{tag}": lambda: images.attention_figure(
            record, cfg.map_layers, page_rows(record, cfg.map_rows)
        ),
        f"fig5_retained_{tag}": lambda: images.retained_figure(record, page_rows(record, cfg.map_rows)),
    }
    if cfg.every_layer:
        for q, item in enumerate(record.questions):
            out[f"fig1b_layers_{tag}_{item.question_id}"] = functools.partial(images.attention_layers_figure, record, q)
    return out


def claims_settings(cfg: FiguresConfig) -> claims.Settings:
    """The claims' inputs, read off the figures' and tables' settings (the same rows)."""
    first = {m: next((p for p in cfg.inference if p.startswith(m)), "") for m in ("fastv", "pdrop")}
    return claims.Settings(
        data=cfg.data, model=cfg.model, trained=(cfg.trained[0], cfg.trained[-1]), layers=tuple(cfg.layers),
        ranker=cfg.ranker, fastv_K=cfg.fastv_K, pdrop_layers=tuple(cfg.pdrop_layers), budgets=tuple(cfg.budgets),
        fastv_point=first["fastv"], pdrop_point=first["pdrop"], lambdas=tuple(cfg.lambdas),
        map_layers=(cfg.map_layers[0], cfg.map_layers[-1]), rankers_ratio=cfg.rankers_ratio,
        rankers_layers=tuple(cfg.rankers_layers))


def claims_of(cfg: FiguresConfig, rows: pd.DataFrame, samples: pd.DataFrame | None,
              records: dict[str, MapRecord]) -> tuple[claims.Inputs, list[claims.Row]]:
    """The claims' inputs (the study's rows, per-sample records and maps) and their table."""
    if samples is None:
        samples = load_samples(cfg.store) if not rows.empty else pd.DataFrame()
    inputs = claims.Inputs(rows, samples, records, claims_settings(cfg))
    return inputs, claims.claims_table(inputs)


def claim_figures(table: list[claims.Row]) -> dict[str, Callable[[], Figure]]:
    """One figure per claim with comparisons, ``claim_<#>`` (:func:`redundancy.plots.forest.claim_figure`)."""
    return {f"claim_{row.claim.number:02d}": functools.partial(
        claim_figure, row.claim.number, row.claim.statement, row.outcome.verdict, row.outcome.n,
        row.outcome.comparisons, row.outcome.margin) for row in table if row.outcome.comparisons}


def write_claims_of(cfg: FiguresConfig, rows: pd.DataFrame, samples: pd.DataFrame | None,
                    records: dict[str, MapRecord]) -> list[Path]:
    """``cfg.claims`` (results/claims.md) and the claims' figures."""
    inputs, table = claims_of(cfg, rows, samples, records)
    paths = [claims.write_claims(inputs, cfg.claims, cfg.store, table)]
    for name, draw in claim_figures(table).items():
        paths += save_figure(draw(), name, cfg.figures, cfg.formats, cfg.dpi)
    return paths


def run(cfg: FiguresConfig) -> str:
    started = time.perf_counter()
    trained_models(cfg)  # settings checked before anything is read
    check_writable(cfg.figures, "figures")
    check_writable(cfg.tables, "tables")
    rows = load_results(cfg.store)
    samples = load_samples(cfg.store) if cfg.samples and not rows.empty else None
    records = load_all_maps(cfg.maps)
    draws = result_figures(cfg, rows, samples)
    claim_inputs, table = claims_of(cfg, rows, samples, records)
    draws.update(claim_figures(table))
    for tag, record in records.items():
        draws.update(map_figures(cfg, tag, record))

    def saving(name: str, draw: Draw) -> Job:
        return lambda: save_figure(draw(), name, cfg.figures, cfg.formats, cfg.dpi)

    def writing(name: str, make: Callable[[], tables.Table]) -> Job:
        return lambda: tables.write_table(make(), name, cfg.tables)

    jobs = {name: saving(name, draw) for name, draw in draws.items()}
    jobs.update({name: writing(name, make) for name, make in result_tables(cfg, rows, samples).items()})
    jobs["claims"] = lambda: [claims.write_claims(claim_inputs, cfg.claims, cfg.store, table)]
    outputs = [
        build(name, job) for name, job in tqdm(jobs.items(), desc="figures", unit="file", disable=not cfg.progress)
    ]
    if not records:
        outputs.append(Output("fig1b / fig5", skipped=f"no attention-map artefacts in {cfg.maps}; "
                              "run: python -m redundancy.maps"))
    head = f"{len(rows)} result rows from {cfg.store}, {len(records)} attention-map artefacts from {cfg.maps}"
    return "\n".join([head, *map(report_line, outputs), f"{time.perf_counter() - started:.1f} s"])


def report_line(out: Output) -> str:
    if out.skipped is not None:
        text = f"{out.name}: skipped ({out.skipped})"
    else:
        stems = sorted({str(p.with_suffix("")) for p in out.files})
        kinds = ",".join(p.suffix[1:] for p in out.files)
        text = f"{out.name}: {', '.join(stems)}.{{{kinds}}}"
    return "\n".join([text, *(f"    missing: {m}" for m in out.missing)])


@hydra.main(version_base="1.3", config_path="conf/figures", config_name="figures")
def main(cfg: DictConfig) -> None:
    matplotlib.use("Agg")  # files only, never a window (set here, not on import: notebooks keep their backend)
    run_entry(run, cfg)


if __name__ == "__main__":
    launch(main, "figures")
