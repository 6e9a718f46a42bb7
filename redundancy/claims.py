"""The paper's claims, checked on recorded results: one row per claim with the paper's statement, the
project's number with its interval, the test, n and a verdict computed here (never written by hand).

    python -m redundancy.figures          # also writes results/claims.md
    write_claims(Inputs.load("results/sweep", "results/maps", Settings()), "results/claims.md")

Verdicts (:data:`REPRODUCED`, :data:`REVERSED`, :data:`INCONCLUSIVE`, :data:`MISSING`) follow from
paired tests (:mod:`redundancy.stats`) at the 5% level, Holm-adjusted across the comparisons one
claim makes. A claim that holds "at every point" is reproduced when every comparison separates in the
claimed direction, not reproduced (reversed) when any separates against it, and inconclusive at this
n otherwise. A claim of "no obvious decline" is an equivalence claim: reproduced when the whole 95%
interval of the change lies above ``-EQUIVALENCE_MARGIN``, reversed when it lies below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from redundancy.plots.frames import column, latest, select
from redundancy.plots.records import MapRecord, load_all_maps
from redundancy.plots.tables import load_card
from redundancy.results import load_results, load_samples
from redundancy.stats import (
    ALPHA,
    Comparison,
    SeededSummary,
    compare,
    compare_differences,
    compare_groups,
    holm,
    seeded_summary,
)

REPRODUCED = "reproduced"
REVERSED = "not reproduced (reversed)"
INCONCLUSIVE = "inconclusive at this n"
MISSING = "not computed yet"
UNTESTABLE = "not testable here"  # the models give the critique nothing to act on (claim 14: no sinks)
EQUIVALENCE_MARGIN = 0.02  # "no obvious decline": a loss of at most 2 points
TIME_TOLERANCE = 0.10  # claim 11: training-time ratio within 0.10 of the FLOPs ratio
BUDGET_TOLERANCE = 0.05  # claim 9: a point meets a budget when its image FLOPs are within 5% of it
FINE, COARSE = "reading", "color"  # claim 10: the fine-grained and the coarse question family
TOP_SHARE = 0.10  # claim 5: attention mass on the top 10% of the image tokens


# ------------------------------------------------------------------ inputs
@dataclass
class Settings:
    """Which rows each claim reads (``redundancy/conf/figures/figures.yaml``'s settings of the figures and tables)."""

    data: str = "microvqa"
    model: str = "micro-llava-vanilla"
    trained: tuple[str, str] = ("micro-llava-vanilla", "micro-llava-pdrop")  # vanilla-, PyramidDrop-trained
    layers: tuple[int, ...] = (2, 8, 16, 24)
    ranker: str = "last"
    fastv_K: int = 2
    pdrop_layers: tuple[int, ...] = (8, 16, 24)
    budgets: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    fastv_point: str = "fastv K=2 R=0.5"
    pdrop_point: str = "pdrop layers=[8, 16, 24] lam=0.5"
    lambdas: tuple[float, ...] = (0.4, 0.5, 0.6)
    map_layers: tuple[int, int] = (2, 16)
    rankers_ratio: float = 0.1  # the critique claims (12-16): the rankers study at this keep ratio
    rankers_layers: tuple[int, ...] = (2, 16)  # ... and these drop layers


@dataclass
class Inputs:
    """Result rows (one per point, the largest evaluation), per-question scores and attention maps."""

    rows: pd.DataFrame
    samples: pd.DataFrame
    maps: dict[str, MapRecord]
    settings: Settings = field(default_factory=Settings)

    @classmethod
    def load(cls, store: str | Path, maps: str | Path, settings: Settings) -> Inputs:
        rows = load_results(store)
        samples = load_samples(store) if not rows.empty else pd.DataFrame()
        return cls(rows, samples, load_all_maps(maps), settings)

    def official(self) -> pd.DataFrame:
        """The method rows (``settings.ranker``, each method's own ranking options) and vanilla rows."""
        if self.rows.empty:
            return self.rows
        return latest(select(self.rows, data=self.settings.data, ranker=self.settings.ranker))

    def scores(self, row: pd.Series) -> pd.Series:
        """Per-question scores of the point ``row``, indexed by question id."""
        mine = self.samples[self.samples["key"] == row["key"]] if not self.samples.empty else self.samples
        if mine.empty:
            raise LookupError(f"no per-sample records for {row['model']} {row['point']}")
        return pd.Series(mine["score"].to_numpy(float), index=mine["question_id"].to_numpy())

    def families(self, row: pd.Series) -> pd.Series:
        mine = self.samples[self.samples["key"] == row["key"]]
        return pd.Series(mine["family"].to_numpy(), index=mine["question_id"].to_numpy())


def find(rows: pd.DataFrame, model: str, method: str, **where: Any) -> pd.Series | None:
    """The row of ``model`` and ``method`` whose columns equal ``where`` (``boundaries`` compared as
    lists, floats to 1e-9), or ``None``."""
    if rows.empty:
        return None
    keep = (rows["model"] == model) & (rows["method"] == method)
    for name, value in where.items():
        col = column(rows, name)
        if name == "boundaries":
            keep &= col.map(lambda b, v=value: list(b) == list(v))
        elif isinstance(value, float):
            keep &= (col.astype(float) - value).abs() < 1e-9
        else:
            keep &= col == value
    hit = rows[keep]
    return hit.iloc[0] if len(hit) else None


# ------------------------------------------------------------------ outcomes
@dataclass
class Outcome:
    """What one claim's test found: the headline number, n, the verdict, and each comparison."""

    number: str
    n: str
    verdict: str
    comparisons: list[tuple[str, Comparison]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    note: str = ""
    margin: float | None = None  # an equivalence claim: its comparisons are read against -margin


def missing(*what: str) -> Outcome:
    return Outcome("-", "-", MISSING, missing=list(what))


def directional(
    named: Sequence[tuple[str, Comparison]], alpha: float = ALPHA
) -> tuple[str, list[tuple[str, Comparison]]]:
    """Verdict of a claim that every comparison (``a - b``, claimed ``> 0``) holds, Holm across them."""
    adjusted = holm([c for _, c in named])
    out = [(name, c) for (name, _), c in zip(named, adjusted)]
    directions = [c.direction(alpha) for _, c in out]
    if directions and all(d == 1 for d in directions):
        return REPRODUCED, out
    if any(d == -1 for d in directions):
        return REVERSED, out
    return INCONCLUSIVE, out


def equivalent(c: Comparison, margin: float = EQUIVALENCE_MARGIN) -> str:
    """Verdict of "no obvious decline" for the change ``c`` (``a - b``): its interval against ``-margin``."""
    if c.low >= -margin:
        return REPRODUCED
    if c.high < -margin:
        return REVERSED
    return INCONCLUSIVE


def tally(named: Sequence[tuple[str, Comparison]], alpha: float = ALPHA) -> str:
    """``8 of 9 comparisons separate as claimed, 1 against`` (Holm-adjusted)."""
    directions = [c.direction(alpha) for _, c in named]
    return (f"{directions.count(1)} of {len(directions)} comparisons separate as claimed, "
            f"{directions.count(-1)} against")


def points(c: Comparison) -> str:
    """A difference in points with its interval: ``-9.0 [-11.6, -6.5]``."""
    return f"{100 * c.diff:+.1f} [{100 * c.low:+.1f}, {100 * c.high:+.1f}]"


# ------------------------------------------------------------------ the claims
def drop_ratios(rows: pd.DataFrame, model: str, layers: Sequence[int]) -> list[float]:
    """Keep ratios below 1 recorded at every one of ``layers`` for ``model`` (method=drop)."""
    drop = rows[(rows["model"] == model) & (rows["method"] == "drop")] if not rows.empty else rows
    if drop.empty:
        return []
    sets = [set(drop.loc[drop["layer"] == k, "ratio"].astype(float)) for k in layers]
    return sorted(r for r in set.intersection(*sets) if r < 1.0) if sets else []


def fig1_command(model: str) -> str:
    study = "redundancy-pdrop" if model.endswith("pdrop") else "fig1_redundancy"
    return f"python -m redundancy.sweep experiment={study}"


def claim_layer2_sensitive(inp: Inputs) -> Outcome:
    s, rows = inp.settings, inp.official()
    van = find(rows, s.model, "vanilla")
    ratios = drop_ratios(rows, s.model, [s.layers[0]])
    if van is None or not ratios:
        return missing(f"{s.model}: the vanilla row and drop rows at layer {s.layers[0]} ({fig1_command(s.model)})")
    ref = inp.scores(van)
    named = [(f"r={r:g}", compare(ref, inp.scores(find(rows, s.model, "drop", layer=s.layers[0], ratio=r))))
             for r in ratios]
    verdict, named = directional(named)
    smallest = min(named, key=lambda x: x[1].diff)
    return Outcome(f"loss at layer {s.layers[0]}: {points(smallest[1])} points at {smallest[0]} (the smallest)",
                   str(smallest[1].n), verdict, named, note=tally(named))


def claim_depth_order(inp: Inputs) -> Outcome:
    s, rows = inp.settings, inp.official()
    ratios = drop_ratios(rows, s.model, s.layers)
    if not ratios:
        return missing(f"{s.model}: drop rows at a common ratio at layers {list(s.layers)} ({fig1_command(s.model)})")

    def mean_over_ratios(layer: int) -> pd.Series:
        per_ratio = [inp.scores(find(rows, s.model, "drop", layer=layer, ratio=r)) for r in ratios]
        return pd.concat(per_ratio, axis=1).mean(axis=1)

    curves = {k: mean_over_ratios(k) for k in s.layers}
    named = [(f"layer {deep} vs {shallow}", compare(curves[deep], curves[shallow]))
             for shallow, deep in zip(s.layers, s.layers[1:])]
    verdict, named = directional(named)
    text = "; ".join(f"{name}: {points(c)}" for name, c in named)
    return Outcome(f"accuracy over r in {{{', '.join(f'{r:g}' for r in ratios)}}}, deeper minus shallower: {text}",
                   str(named[0][1].n), verdict, named, note=tally(named))


def equivalence_claim(inp: Inputs, layer: int, ratio: float) -> Outcome:
    s, rows = inp.settings, inp.official()
    van, drop = find(rows, s.model, "vanilla"), find(rows, s.model, "drop", layer=layer, ratio=ratio)
    if van is None or drop is None:
        return missing(f"{s.model}: vanilla and drop layer={layer} ratio={ratio:g} ({fig1_command(s.model)})")
    c = compare(inp.scores(drop), inp.scores(van))
    return Outcome(f"change from no drop: {points(c)} points ({100 * c.a:.1f}% vs {100 * c.b:.1f}%)", str(c.n),
                   equivalent(c), [(f"layer {layer}, r={ratio:g} vs vanilla", c)],
                   note=f"equivalence margin {100 * EQUIVALENCE_MARGIN:.0f} points", margin=EQUIVALENCE_MARGIN)


def claim_layer16(inp: Inputs) -> Outcome:
    return equivalence_claim(inp, 16, 0.1)


def claim_layer24(inp: Inputs) -> Outcome:
    return equivalence_claim(inp, 24, 0.0)


def entropy(values: np.ndarray) -> float:
    """Normalised entropy (0: one token, 1: uniform) of an attention map over the image tokens."""
    p = np.nan_to_num(np.asarray(values, np.float64).ravel())
    total = p.sum()
    if total <= 0:
        return math.nan
    p = p / total
    nz = p[p > 0]
    return float(-(nz * np.log(nz)).sum() / math.log(p.size))


def top_mass(values: np.ndarray, share: float = TOP_SHARE) -> float:
    """Share of the image attention on the top ``share`` of the image tokens."""
    p = np.sort(np.nan_to_num(np.asarray(values, np.float64).ravel()))[::-1]
    total = p.sum()
    return float(p[: max(1, round(share * p.size))].sum() / total) if total > 0 else math.nan


def claim_attention(inp: Inputs) -> Outcome:
    s = inp.settings
    record = next((r for r in inp.maps.values() if r.model == s.model), None)
    shallow, deep = s.map_layers
    if record is None or not {shallow, deep} <= set(record.layers):
        return missing(f"attention maps of {s.model} at layers {shallow} and {deep} (python -m redundancy.maps)")
    qs = range(len(record.questions))
    stats = {(k, name): np.array([f(record.attention_at(q, k)) for q in qs])
             for k in (shallow, deep) for name, f in (("entropy", entropy), ("top", top_mass))}
    ok = ~np.isnan(sum(stats.values()))
    named = [(f"entropy (x100), layer {shallow} minus {deep}",
              compare_differences(stats[shallow, "entropy"][ok] - stats[deep, "entropy"][ok])),
             (f"top-10% mass (x100), layer {deep} minus {shallow}",
              compare_differences(stats[deep, "top"][ok] - stats[shallow, "top"][ok]))]
    verdict, named = directional(named)
    mean = {key: float(v[ok].mean()) for key, v in stats.items()}
    number = (f"entropy {mean[shallow, 'entropy']:.2f} (layer {shallow}) "
              f"vs {mean[deep, 'entropy']:.2f} (layer {deep}); "
              f"top-10% mass {mean[shallow, 'top']:.2f} vs {mean[deep, 'top']:.2f}")
    return Outcome(number, f"{int(ok.sum())} questions", verdict, named,
                   note="normalised entropy of the image attention; the recorded questions of the maps artefact")


def claim_trained_keeps_more(inp: Inputs) -> Outcome:
    s, rows = inp.settings, inp.official()
    vanilla, trained = s.trained
    v_ref, t_ref = find(rows, vanilla, "vanilla"), find(rows, trained, "vanilla")
    ratios = [r for r in drop_ratios(rows, vanilla, s.layers) if r in drop_ratios(rows, trained, s.layers)]
    if v_ref is None or t_ref is None or not ratios:
        return missing(f"{vanilla} and {trained}: vanilla rows and drop rows at layers {list(s.layers)} "
                       f"({fig1_command(vanilla)}; {fig1_command(trained)})")
    v0, t0 = inp.scores(v_ref), inp.scores(t_ref)
    named = []
    for k in s.layers:
        for r in ratios:
            dv = inp.scores(find(rows, vanilla, "drop", layer=k, ratio=r)) - v0
            dt = inp.scores(find(rows, trained, "drop", layer=k, ratio=r)) - t0
            named.append((f"layer {k}, r={r:g}", compare_differences((dt - dv.reindex(dt.index)).to_numpy())))
    verdict, named = directional(named)
    worst = min(named, key=lambda x: x[1].diff)
    return Outcome(f"PyramidDrop-trained minus vanilla-trained change from no drop: {points(worst[1])} points at "
                   f"{worst[0]} (the least favourable)", str(worst[1].n), verdict, named, note=tally(named))


def claim_table3(inp: Inputs) -> Outcome:
    s, rows = inp.settings, inp.official()
    vanilla, trained = s.trained
    on_v, on_t = (find(rows, m, "fastv", point=s.fastv_point) for m in (vanilla, trained))
    if on_v is None or on_t is None:
        return missing(*(f"{s.fastv_point} on {m} (python -m redundancy.sweep experiment=table5_inference model={m})"
                         for m, row in ((vanilla, on_v), (trained, on_t)) if row is None))
    c = compare(inp.scores(on_t), inp.scores(on_v))
    verdict, named = directional([(f"{s.fastv_point}: PyramidDrop-trained minus vanilla-trained", c)])
    return Outcome(f"{100 * c.a:.1f}% vs {100 * c.b:.1f}%: {points(c)} points", str(c.n), verdict, named)


def claim_pdrop_vs_fastv(inp: Inputs) -> Outcome:
    s, rows = inp.settings, inp.official()
    van, fastv, pdrop = (find(rows, s.model, m, point=p) for m, p in
                         (("vanilla", "vanilla"), ("fastv", s.fastv_point), ("pdrop", s.pdrop_point)))
    if van is None or fastv is None or pdrop is None:
        return missing(f"{s.model}: vanilla, {s.fastv_point}, {s.pdrop_point} "
                       "(python -m redundancy.sweep -m experiment=table5_inference,table4_lambda)")
    c = compare(inp.scores(pdrop), inp.scores(fastv))
    verdict, named = directional([("PyramidDrop minus FastV", c)])
    flops = f"image TFLOPs {pdrop['image_tflops']:.3g} (PyramidDrop) vs {fastv['image_tflops']:.3g} (FastV)"
    return Outcome(f"loss from vanilla {100 * (van['accuracy'] - pdrop['accuracy']):.1f} (PyramidDrop) vs "
                   f"{100 * (van['accuracy'] - fastv['accuracy']):.1f} (FastV) points; PyramidDrop minus FastV "
                   f"{points(c)}", str(c.n), verdict, named, note=flops)


def budget_pairs(inp: Inputs) -> list[tuple[float, pd.Series, pd.Series]]:
    """Per budget: the FastV and PyramidDrop rows whose image FLOPs meet it (within the tolerance)."""
    s, rows = inp.settings, inp.official()
    van = find(rows, s.model, "vanilla")
    if van is None:
        return []
    mine = rows[rows["model"] == s.model]
    fastv = mine[(mine["method"] == "fastv") & (column(mine, "params.K") == s.fastv_K)]
    pdrop = mine[(mine["method"] == "pdrop") & mine["boundaries"].map(lambda b: list(b) == list(s.pdrop_layers))]
    out = []
    for b in s.budgets:
        target = b * float(van["image_tflops"])
        picks = []
        for part in (fastv, pdrop):
            off = (part["image_tflops"] - target).abs() / target
            picks.append(part.loc[off.idxmin()] if len(part) and off.min() <= BUDGET_TOLERANCE else None)
        if picks[0] is not None and picks[1] is not None:
            out.append((b, picks[0], picks[1]))
    return out


def claim_fig4(inp: Inputs) -> Outcome:
    pairs = budget_pairs(inp)
    if len(pairs) < 2:
        return missing(f"{inp.settings.model}: FastV and PyramidDrop rows at two or more FLOPs budgets "
                       "(python -m redundancy.sweep -m experiment=fig4_fastv,fig4_pdrop)")
    diffs = {b: inp.scores(p) - inp.scores(f) for b, f, p in pairs}
    named = [(f"budget {b:g}: PyramidDrop minus FastV", compare(inp.scores(p), inp.scores(f))) for b, f, p in pairs]
    small, large = min(diffs), max(diffs)
    widening = diffs[small] - diffs[large].reindex(diffs[small].index)
    named.append((f"gap at budget {small:g} minus gap at {large:g}", compare_differences(widening.to_numpy())))
    verdict, named = directional(named)
    gaps = ", ".join(f"{b:g}: {100 * c.diff:+.1f}" for b, (_, c) in zip(sorted(diffs), named))
    return Outcome(f"PyramidDrop minus FastV by budget (points): {gaps}", str(named[0][1].n), verdict, named,
                   note=tally(named))


def claim_lambda(inp: Inputs) -> Outcome:
    s, rows = inp.settings, inp.official()
    layers = ", ".join(map(str, s.pdrop_layers))
    lo, hi = min(s.lambdas), max(s.lambdas)
    small, large = (find(rows, s.model, "pdrop", point=f"pdrop layers=[{layers}] lam={lam}") for lam in (lo, hi))
    if small is None or large is None:
        return missing(f"{s.model}: PyramidDrop at lam={lo} and lam={hi} "
                       "(python -m redundancy.sweep experiment=table4_lambda)")
    cost = inp.scores(large) - inp.scores(small)  # what the smaller lambda costs, per question
    family = inp.families(large).reindex(cost.index)
    fine, coarse = cost[family == FINE].to_numpy(), cost[family == COARSE].to_numpy()
    if not len(fine) or not len(coarse):
        return missing(f"questions of the families {FINE!r} and {COARSE!r} in the per-sample records")
    c = compare_groups(fine, coarse)
    verdict, named = directional([(f"cost of lam={lo} against lam={hi}: {FINE} minus {COARSE}", c)])
    return Outcome(f"cost of lam={lo}: {100 * fine.mean():.1f} ({FINE}) vs {100 * coarse.mean():.1f} ({COARSE}) "
                   f"points; difference {points(c)}", f"{len(fine)} + {len(coarse)}", verdict, named,
                   note="inference-time lambda study (the paper's Table 4 ablates lambda in training)")


def claim_training_cost(inp: Inputs) -> Outcome:
    s, rows = inp.settings, inp.official()
    vanilla, trained = s.trained
    try:
        cards = [load_card(m) for m in (vanilla, trained)]
    except FileNotFoundError as err:
        return missing(str(err))
    # the stages the two variants differ in: those the PyramidDrop run trained under drop
    differ = [st["name"] for st in cards[1].get("train_config", {}).get("stages", []) if st.get("drop")] or ["final"]
    walls = [sum(c.get("training_wall_s", {}).get(st, math.nan) for st in differ) for c in cards]
    walls = [None if math.isnan(w) else w for w in walls]
    van, pdrop = find(rows, s.model, "vanilla"), find(rows, s.model, "pdrop", point=s.pdrop_point)
    if None in walls or van is None or pdrop is None:
        return missing("the final stage's wall time in both cards and the full-sequence FLOPs of vanilla and "
                       f"{s.pdrop_point} (python -m redundancy.sweep -m experiment=table5_inference,table4_lambda)")
    time_ratio = walls[1] / walls[0]
    flops_ratio = float(pdrop["full_tflops"]) / float(van["full_tflops"])
    verdict = REPRODUCED if abs(time_ratio - flops_ratio) <= TIME_TOLERANCE else REVERSED
    return Outcome(f"{'+'.join(differ)}: {time_ratio:.2f} of vanilla's time; "
                   f"full-sequence FLOPs ratio {flops_ratio:.2f}",
                   "1 run each", verdict,
                   note=f"no interval (one timed run per model): verdict by a tolerance of {TIME_TOLERANCE:.2f}")


# ------------------------------------------------------------------ the critiques (the rankers study)
RANKERS_COMMAND = "python -m redundancy.sweep -m experiment=rankers model=micro-llava-vanilla,micro-llava-pdrop"
BASELINES = ("random", "uniform", "pool")  # claim 15: the baselines without a score


def not_run(*what: str) -> Outcome:
    """A critique whose rows are not recorded yet."""
    return Outcome("not run", "-", MISSING, missing=[*what, RANKERS_COMMAND])


def study_row(inp: Inputs, model: str, ranker: str, layer: int) -> pd.DataFrame:
    """The rankers study's rows of ``model`` and ``ranker`` at ``layer`` and the settings' ratio (a
    seeded ranker: one per seed); empty when absent."""
    s = inp.settings
    rows = latest(select(inp.rows, model=model, data=s.data, method="drop", ranker=ranker)) if not inp.rows.empty \
        else inp.rows
    if rows.empty:
        return rows
    return rows[(rows["ranker"] == ranker) & (rows["layer"] == layer)
                & ((rows["ratio"].astype(float) - s.rankers_ratio).abs() < 1e-9)]


def per_question(inp: Inputs, rows: pd.DataFrame) -> pd.Series:
    """Per-question scores of the rows' points, averaged over the rows (a seeded ranker's seeds)."""
    return pd.concat([inp.scores(row) for _, row in rows.iterrows()], axis=1).mean(axis=1)


def kept_share(inp: Inputs, rows: pd.DataFrame, value: str) -> pd.Series:
    """Per question, ``value`` of its per-sample record at the first boundary (``kept_bottom``, ``kept_sinks``:
    :func:`redundancy.spatial.question_numbers`) as a share of the image tokens kept there, averaged over
    the rows (a seeded ranker's seeds)."""
    shares = []
    for _, row in rows.iterrows():
        mine = inp.samples[inp.samples["key"] == row["key"]]
        if value not in mine or mine[value].isna().any():
            raise LookupError(f"{row['model']} {row['point']} {row['ranker']}: per-sample records without "
                              f"{value} (written before the spatial diagnostics; rerun with rerun=true)")
        numerator = mine[value].map(lambda v: v[0]).to_numpy(float)
        denominator = mine["kept"].map(lambda v: v[1]).to_numpy(float)
        shares.append(pd.Series(numerator / np.maximum(denominator, 1), index=mine["question_id"].to_numpy()))
    return pd.concat(shares, axis=1).mean(axis=1)


def study_pairs(inp: Inputs, a: str, b: str) -> tuple[list[tuple[str, pd.DataFrame, pd.DataFrame]], list[str]]:
    """Per shipped model and drop layer of the settings, the rows of rankers ``a`` and ``b``; and what is absent."""
    s = inp.settings
    found, absent = [], []
    for model in dict.fromkeys(s.trained):
        for layer in s.rankers_layers:
            ra, rb = study_row(inp, model, a, layer), study_row(inp, model, b, layer)
            if ra.empty or rb.empty:
                absent.append(f"{model}: {a} and {b} at layer {layer}, r={s.rankers_ratio:g}")
            else:
                found.append((f"{model}, layer {layer}", ra, rb))
    return found, absent


def claim_positional_tokens(inp: Inputs) -> Outcome:
    pairs, absent = study_pairs(inp, "last", "norope")
    if not pairs:
        return not_run(*absent)
    named, numbers = [], []
    for name, last, norope in pairs:
        a, b = kept_share(inp, last, "kept_bottom"), kept_share(inp, norope, "kept_bottom")
        named.append(
            (f"{name}: bottom share, last minus norope", compare_differences((a - b.reindex(a.index)).to_numpy()))
        )
        named.append((f"{name}: bottom share of last minus 0.5", compare_differences((a - 0.5).to_numpy())))
        numbers.append(f"{name}: last {a.mean():.2f}, norope {b.mean():.2f}")
    verdict, named = directional(named)
    return Outcome("bottom-half share of the kept image tokens: " + "; ".join(numbers), str(named[0][1].n), verdict,
                   named, missing=absent, note=tally(named))


def claim_positional_accuracy(inp: Inputs) -> Outcome:
    from redundancy.plots.spatial import evidence_accuracy, test_set_positions

    s = inp.settings
    positions = test_set_positions(inp.rows)
    if positions is None:
        return not_run(f"rows on the shipped {s.data} test set (its questions' evidence boxes)")
    named, numbers, absent = [], [], []
    for model in dict.fromkeys(s.trained):
        van = find(inp.official(), model, "vanilla")
        for layer in s.rankers_layers:
            last = study_row(inp, model, "last", layer)
            if van is None or last.empty:
                absent.append(f"{model}: vanilla and last at layer {layer}, r={s.rankers_ratio:g}")
                continue
            scores = per_question(inp, last)
            change = scores - inp.scores(van).reindex(scores.index)
            where = np.asarray(change.index.map(lambda q: positions.get(str(q))))
            named.append((f"{model}, layer {layer}: change from no drop, bottom- minus top-evidence questions",
                          compare_groups(change[where == "bottom"].to_numpy(), change[where == "top"].to_numpy())))
            split = evidence_accuracy(scores, positions)
            numbers.append(f"{model}, layer {layer}: accuracy under last, bottom-evidence {split['bottom'].text()} "
                           f"vs top-evidence {split['top'].text()}")
    if not named:
        return not_run(*absent)
    verdict, named = directional(named)
    return Outcome("; ".join(numbers), str(named[0][1].n), verdict, named, missing=absent,
                   note="evidence position by redundancy.data.evidence_position (the evidence boxes' rows); "
                        + tally(named))


def claim_sinks(inp: Inputs) -> Outcome:
    pairs, absent = study_pairs(inp, "nosink", "last")
    if not pairs:
        return not_run(*absent)
    named, shares, present = [], [], []
    for name, nosink, last in pairs:
        named.append((f"{name}: nosink minus last", compare(per_question(inp, nosink), per_question(inp, last))))
        try:
            shares.append(f"{name}: {100 * kept_share(inp, last, 'kept_sinks').mean():.1f}%")
            present.append(float(kept_share(inp, last, "present_sinks").sum()))
        except LookupError as err:
            absent.append(str(err))
    verdicts = [equivalent(c) for _, c in named]
    verdict = REVERSED if REVERSED in verdicts else REPRODUCED if all(v == REPRODUCED for v in verdicts) \
        else INCONCLUSIVE
    note = (f"equivalence margin {100 * EQUIVALENCE_MARGIN:.0f} points; sinks: hidden-state norm at least "
            "SINK_NORM_RATIO times the image tokens' median (redundancy.ranking.sink_mask)")
    if present and not any(present):  # nosink then ranks exactly as last: the critique has nothing to act on
        verdict = UNTESTABLE
        note = "no image token of any question passes the sink rule on these models, so nosink ranks as last; " + note
    number = "; ".join(f"{n}: {points(c)}" for n, c in named)
    kept = f"sinks among last's kept tokens: {'; '.join(shares)}" if shares else "sinks not counted"
    return Outcome(f"{number} ({kept})", str(named[0][1].n), verdict, named, missing=absent,
                   margin=EQUIVALENCE_MARGIN, note=note)


def claim_baselines(inp: Inputs) -> Outcome:
    named, absent = [], []
    for baseline in BASELINES:
        pairs, missing_here = study_pairs(inp, baseline, "last")
        absent += missing_here
        named += [(f"{name}: {baseline} minus last", compare(per_question(inp, a), per_question(inp, b)))
                  for name, a, b in pairs]
    if not named:
        return not_run(*absent)
    named = list(zip([n for n, _ in named], holm([c for _, c in named])))
    against = any(c.direction() == -1 for _, c in named)
    within = all(equivalent(c) == REPRODUCED for _, c in named)
    verdict = REVERSED if against else REPRODUCED if within else INCONCLUSIVE
    worst = min(named, key=lambda x: x[1].diff)
    against_count = sum(c.direction() == -1 for _, c in named)
    return Outcome(f"least favourable: {worst[0]} {points(worst[1])} points", str(worst[1].n), verdict, named,
                   missing=absent, note=f"{against_count} of {len(named)} comparisons separate against the baseline "
                   f"(Holm); equivalence margin {100 * EQUIVALENCE_MARGIN:.0f} points")


def claim_fastv_definition(inp: Inputs) -> Outcome:
    pairs, absent = study_pairs(inp, "mean", "last")
    if not pairs:
        return not_run(*absent)
    compared = holm([compare(per_question(inp, a), per_question(inp, b)) for _, a, b in pairs])
    named = [(f"{name}: mean minus last", c) for (name, _, _), c in zip(pairs, compared)]
    if any(c.direction() != 0 for _, c in named):
        verdict = REPRODUCED
    elif all(-EQUIVALENCE_MARGIN <= c.low and c.high <= EQUIVALENCE_MARGIN for _, c in named):
        verdict = REVERSED
    else:
        verdict = INCONCLUSIVE
    return Outcome("; ".join(f"{n}: {points(c)}" for n, c in named), str(named[0][1].n), verdict, named,
                   missing=absent, note=f"reproduced: a comparison separates (Holm); not reproduced: every 95% "
                   f"interval within +-{100 * EQUIVALENCE_MARGIN:.0f} points")


@dataclass(frozen=True)
class Claim:
    number: int
    source: str
    statement: str
    test: str
    check: Callable[[Inputs], Outcome]


CLAIMS: tuple[Claim, ...] = (
    Claim(1, "Fig. 1a", "At layer 2 the model is sensitive to dropping image tokens at every ratio.",
          "exact McNemar per ratio < 1, vanilla vs drop at layer 2; Holm", claim_layer2_sensitive),
    Claim(2, "Fig. 1a", "Redundancy grows with depth: at equal ratio the loss shrinks from layer 2 to 8 to 16 to 24.",
          "sign-flip permutation test of per-question accuracy averaged over the ratios, each deeper layer "
          "against the one before; Holm", claim_depth_order),
    Claim(3, "Fig. 1a", "At layer 16, keeping 10% of the image tokens causes no obvious decline.",
          f"equivalence: 95% paired-bootstrap interval of drop minus vanilla above -{100 * EQUIVALENCE_MARGIN:.0f} "
          "points", claim_layer16),
    Claim(4, "Fig. 1a", "At layer 24, performance is nearly independent of the image tokens.",
          f"equivalence at r=0 (every image token dropped from layer 24): interval above "
          f"-{100 * EQUIVALENCE_MARGIN:.0f} points", claim_layer24),
    Claim(5, "Fig. 1b", "Shallow layers attend to most image tokens, deep layers to a few instruction-related ones.",
          "sign-flip test over the recorded questions: attention entropy higher and top-10% mass lower at "
          "the shallow layer; Holm", claim_attention),
    Claim(6, "Fig. 3", "At every layer and ratio, the PyramidDrop-trained model keeps more than the vanilla one.",
          "sign-flip permutation test of the per-question difference of the two models' changes from no drop, "
          "every layer and ratio < 1; Holm", claim_trained_keeps_more),
    Claim(7, "Table 3", "FastV on the PyramidDrop-trained model scores higher than FastV on the vanilla model.",
          "exact McNemar, the same FastV point on both models", claim_table3),
    Claim(8, "Tables 1/5", "PyramidDrop at inference matches vanilla more closely than FastV at similar FLOPs.",
          "exact McNemar, PyramidDrop vs FastV (Table 5's points)", claim_pdrop_vs_fastv),
    Claim(9, "Fig. 4", "PyramidDrop dominates FastV across FLOPs budgets, with a gap that widens as the budget "
          "shrinks.", "exact McNemar per budget, and a sign-flip test of the gap at the smallest minus the largest "
          "budget; Holm", claim_fig4),
    Claim(10, "Table 4", "A smaller lambda costs more on fine-grained questions (reading) than on coarse ones.",
          f"two-group permutation test: per-question cost of the smallest lambda, {FINE} vs {COARSE} questions",
          claim_lambda),
    Claim(11, "Training cost", "PyramidDrop training time relative to vanilla is close to its FLOPs ratio.",
          f"final-stage wall-time ratio within {TIME_TOLERANCE:.2f} of the full-sequence FLOPs ratio",
          claim_training_cost),
    Claim(12, "FEATHER (positional bias)", "With RoPE, last-token attention keeps mostly bottom-of-image tokens: more "
          "of its kept tokens lie in the bottom half than without RoPE (norope), and more than half.",
          "sign-flip permutation test of the per-question bottom-half share of the kept tokens, last minus norope "
          "and last minus 0.5, per model and layer at the study's ratio; Holm", claim_positional_tokens),
    Claim(13, "FEATHER (positional bias)", "Under last-token ranking, questions whose evidence lies in the bottom "
          "half lose less accuracy than questions whose evidence lies in the top half.",
          "two-group permutation test of the per-question change from no drop, bottom- vs top-evidence questions, "
          "per model and layer; Holm", claim_positional_accuracy),
    Claim(14, "Attention sinks", "Leaving the sink tokens out of the ranking (nosink) barely changes accuracy.",
          f"equivalence: 95% paired-bootstrap interval of nosink minus last above -{100 * EQUIVALENCE_MARGIN:.0f} "
          "points, per model and layer", claim_sinks),
    Claim(15, "Simple baselines", "Random, spatially uniform and pooled tokens are competitive with last-token "
          "ranking at equal FLOPs.", "exact McNemar (random: sign-flip test of its mean over 5 seeds) of baseline "
          "minus last, per model and layer; Holm; competitive: none separates against the baseline and every 95% "
          f"interval lies above -{100 * EQUIVALENCE_MARGIN:.0f} points", claim_baselines),
    Claim(16, "FastV paper vs code", "FastV's paper score (mean attention from the image on, mean) and its code's "
          "(the last token, last) give different accuracy at equal FLOPs.",
          "exact McNemar of mean minus last, per model and layer; Holm; the same accuracy (not reproduced): "
          f"every 95% interval within +-{100 * EQUIVALENCE_MARGIN:.0f} points", claim_fastv_definition),
)


# ------------------------------------------------------------------ the table
@dataclass
class Row:
    claim: Claim
    outcome: Outcome


def claims_table(inp: Inputs, claims: Sequence[Claim] = CLAIMS) -> list[Row]:
    """Every claim's outcome; a claim whose inputs are absent says which (never an error)."""
    out = []
    for claim in claims:
        try:
            outcome = claim.check(inp)
        except LookupError as err:  # rows without per-sample records
            outcome = missing(str(err))
        out.append(Row(claim, outcome))
    return out


def seeded_controls(inp: Inputs, control: str = "random") -> list[tuple[int, float, SeededSummary]]:
    """Per (layer, ratio) of the drop study on ``settings.model``: the seeded ``control`` ranker over
    its seeds against the attention ranking (:func:`redundancy.stats.seeded_summary`)."""
    s = inp.settings
    if inp.rows.empty:
        return []
    attention = inp.official()
    rows = latest(select(inp.rows, model=s.model, data=s.data, method="drop", ranker=control))
    rows = rows[rows["ranker"] == control]
    out = []
    for (layer, ratio), group in rows.groupby(["layer", "ratio"], sort=True):
        if not 0.0 < float(ratio) < 1.0:  # r=0 and r=1 keep the same tokens whatever the ranking
            continue
        ref = find(attention, s.model, "drop", layer=layer, ratio=float(ratio))
        if ref is None:
            continue
        seeds = column(group, "params.seed").fillna(0).astype(int)
        per_seed = {int(i): inp.scores(row) for i, (_, row) in zip(seeds, group.iterrows())}
        out.append((int(layer), float(ratio), seeded_summary(per_seed, inp.scores(ref))))
    return out


def controls_markdown(controls: Sequence[tuple[int, float, SeededSummary]], ranker: str) -> list[str]:
    """The seeded-control section of ``claims.md``."""
    lines = ["## The random control against attention ranking", ""]
    if not controls:
        return [*lines, "No random-control rows with an attention-ranked counterpart (python -m redundancy.sweep "
                "experiment=fig1_redundancy).", ""]
    lines += [f"Accuracy (%) of the random control over its seeds (mean +- sample sd, min, max) and of attention "
              f"ranking ({ranker}); the last columns count the seeds whose paired gap to attention ranking "
              "(exact McNemar, Holm across the seeds) separates from 0, and give the mean gap.", "",
              "| layer | r | attention | random control | seeds separated | mean gap (attention - random) |",
              "|---|---|---|---|---|---|"]
    for layer, ratio, summary in controls:
        gap = float(np.mean([c.diff for c in summary.per_seed]))
        lines.append(f"| {layer} | {ratio:g} | {100 * summary.per_seed[0].a:.1f} | {summary.text()} | "
                     f"{summary.separated()} of {len(summary.seeds)} | {100 * gap:+.1f} |")
    if max(len(c[2].seeds) for c in controls) < 5:
        lines += ["", "Fewer than 5 seeds per point: rerun the study (`seeds: 5` in conf/sweep/experiment/)."]
    return [*lines, ""]


def cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(table: Sequence[Row], source: str = "results/sweep",
             controls: Sequence[tuple[int, float, SeededSummary]] = (), ranker: str = "last") -> str:
    """``claims.md``: the table, each claim's comparisons and what is missing, then the seeded controls."""
    lines = [
        "# The paper's claims on this harness's models",
        "",
        f"Generated by `python -m redundancy.figures` from `{source}` (redundancy/claims.py); do not edit. "
        "Numbers are accuracy points (percent) with 95% intervals; verdicts are computed from the stated test at "
        f"the 5% level, Holm-adjusted across the comparisons of one claim. Verdicts: {REPRODUCED}; {REVERSED} "
        f"(separated against the claim); {INCONCLUSIVE} (not separated either way); {UNTESTABLE} (the models "
        f"give the claim nothing to act on, e.g. no sink tokens); {MISSING} (inputs absent).",
        "",
        "The column *detects* gives the smallest difference, in points, that each claim's paired tests "
        "detect at their n with 80% power (the range over its comparisons; redundancy.stats.detectable_difference): "
        "a difference below it is not distinguishable at this n. Each claim with comparisons has its figure, "
        "`figures/claim_<#>` (each comparison with its interval).",
        "",
        "| # | source | the paper | this project (95% CI) | test | n | detects | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        c, o = row.claim, row.outcome
        lines.append(f"| {c.number} | {c.source} | {cell(c.statement)} | {cell(o.number)} | {cell(c.test)} | "
                     f"{cell(o.n)} | {detects(o)} | **{o.verdict}** |")
    lines += ["", "## Details", ""]
    for row in table:
        c, o = row.claim, row.outcome
        lines += [f"### Claim {c.number} ({c.source}): {o.verdict}", ""]
        if o.note:
            lines += [f"{o.note}.", ""]
        lines += [f"- {name}: {comparison.text()}, n={comparison.n}" for name, comparison in o.comparisons]
        lines += [f"- missing: {what}" for what in o.missing]
        lines.append("")
    lines += controls_markdown(controls, ranker)
    return "\n".join(lines).rstrip() + "\n"


def detects(outcome: Outcome) -> str:
    """The smallest difference (points) the claim's comparisons detect with 80% power: ``3.1`` or the
    range ``2.4-3.5`` over its comparisons; ``-`` without comparisons."""
    values = sorted(100 * c.detectable for _, c in outcome.comparisons
                    if c.detectable is not None and not math.isnan(c.detectable))
    if not values:
        return "-"
    low, high = f"{values[0]:.1f}", f"{values[-1]:.1f}"
    return low if low == high else f"{low}-{high}"


def write_claims(inp: Inputs, path: str | Path, source: str = "results/sweep",
                 table: Sequence[Row] | None = None) -> Path:
    """``path`` (``results/claims.md``): :func:`claims_table` (or the given ``table`` of it) and
    :func:`seeded_controls` of ``inp``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = claims_table(inp) if table is None else table
    text = markdown(table, source, seeded_controls(inp), inp.settings.ranker)
    path.write_text(text, encoding="utf-8")
    return path
