"""The study's tables, each built from a results DataFrame (or the checkpoints' cards) by one function,
and written as Markdown (formatted, with notes) and CSV (raw numbers).

    inference_table(df, model="micro-llava-vanilla")          # PyramidDrop Table 5
    lambda_table(df, model="micro-llava-vanilla")             # PyramidDrop Table 4
    training_table(["micro-llava-vanilla", "micro-llava-pdrop"])
    write_table(table, "table5_inference", "results/tables")

Accuracy columns are in percent; TFLOPs are per sample, image-part and full-sequence LM prefill
in the convention each row records (named in the table's notes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from redundancy.plots.frames import FAMILY_PREFIX, NothingToDraw, column, families, note_missing, rows_of_model
from redundancy.stats import compare, holm

INFERENCE_POINTS = ("vanilla", "fastv K=2 R=0.5", "pdrop layers=[8, 16, 24] lam=0.5")
LAMBDAS = (0.4, 0.5, 0.6)


@dataclass
class Table:
    """A table's values (``frame``: numbers, percent for accuracy) and the notes printed under it."""

    title: str
    frame: pd.DataFrame
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ from result rows
def accuracy_columns(rows: pd.DataFrame) -> pd.DataFrame:
    """``accuracy %``, its interval and one ``<family> %`` column per question family."""
    out = pd.DataFrame(index=rows.index)
    out["accuracy %"] = 100 * rows["accuracy"]
    level = round(100 * float(rows["ci_level"].iloc[0])) if len(rows) else 95
    out[f"{level}% CI low"] = 100 * rows["ci_low"]
    out[f"{level}% CI high"] = 100 * rows["ci_high"]
    for family in families(rows):
        out[f"{family} %"] = 100 * rows[FAMILY_PREFIX + family]
    out["n"] = rows["n"]
    return out


def paired_columns(rows: pd.DataFrame, samples: pd.DataFrame | None) -> pd.DataFrame:
    """Each row against the table's vanilla row on the same questions: the difference in points, its
    95% paired-bootstrap interval and the exact McNemar p-value, Holm-adjusted across the table's rows
    (:mod:`redundancy.stats`). Empty without per-sample records or a vanilla row."""
    names = ["vs vanilla (points)", "paired 95% CI", "Holm p"]
    out = pd.DataFrame(index=rows.index, columns=names, dtype=object)
    van = rows[rows["method"] == "vanilla"]
    if samples is None or samples.empty or van.empty:
        return out.drop(columns=names)

    def scores(key: str) -> pd.Series:
        mine = samples[samples["key"] == key]
        return pd.Series(mine["score"].to_numpy(float), index=mine["question_id"].to_numpy())

    ref = scores(van["key"].iloc[0])
    others = rows[rows["method"] != "vanilla"]
    tests = holm([compare(scores(k), ref) for k in others["key"]])
    for index, c in zip(others.index, tests):
        out.loc[index, names] = [
            f"{100 * c.diff:+.1f}",
            f"[{100 * c.low:+.1f}, {100 * c.high:+.1f}]",
            f"{c.p_holm:.2g}",
        ]
    return out.fillna("-")


def paired_note(frame: pd.DataFrame) -> list[str]:
    if "Holm p" not in frame:
        return []
    return ["vs vanilla: paired difference on the same questions, 95% paired-bootstrap interval, exact McNemar "
            "p-value Holm-adjusted across the table's rows (redundancy.stats)."]


def cost_columns(rows: pd.DataFrame, vanilla_tflops: float | None) -> pd.DataFrame:
    out = pd.DataFrame(index=rows.index)
    out["image TFLOPs"] = rows["image_tflops"]
    out["vs vanilla"] = rows["image_tflops"] / vanilla_tflops if vanilla_tflops else math.nan
    out["full TFLOPs"] = rows["full_tflops"]
    out["image tokens/layer"] = rows["avg_image_tokens"]
    return out


def flops_note(rows: pd.DataFrame) -> list[str]:
    conventions = sorted(set(column(rows, "flops_convention").dropna()))
    return [f"FLOPs per sample, {c}." for c in conventions]


def pick_points(rows: pd.DataFrame, points: Sequence[str], what: str) -> pd.DataFrame:
    """The rows whose ``point`` label is in ``points``, in that order (absent ones reported)."""
    found = [p for p in points if (rows["point"] == p).any()]
    for p in points:
        if p not in found:
            note_missing(f"{what}: no row for {p!r}")
    if not found:
        raise NothingToDraw(f"{what}: none of {list(points)} in the results")
    return pd.concat([rows[rows["point"] == p].head(1) for p in found])


def inference_table(
    results: pd.DataFrame, samples: pd.DataFrame | None = None, *, model: str | None = None, data: str | None = None,
    points: Sequence[str] = INFERENCE_POINTS, ranker: str = "last",
) -> Table:
    """PyramidDrop Table 5: image-part and full TFLOPs, measured prefill latency and accuracy
    (overall and per family) of each point in ``points`` (the rows' ``point`` labels)."""
    rows = rows_of_model(results, model, data, ranker)
    picked = pick_points(rows, points, "inference table")
    van = rows[rows["method"] == "vanilla"]
    base = float(van["image_tflops"].iloc[0]) if len(van) else None
    latency = pd.DataFrame({
        "prefill ms": picked["prefill_ms"], "vanilla ms, same rounds": column(picked, "prefill_vanilla_ms"),
        "prefill speedup": column(picked, "prefill_speedup"),
    })
    frame = pd.concat([picked[["point"]].rename(columns={"point": "method"}), cost_columns(picked, base), latency,
                       accuracy_columns(picked), paired_columns(picked, samples)], axis=1)
    notes = flops_note(picked) + paired_note(frame)
    if frame["prefill ms"].isna().any():
        note_missing("inference table: some rows have no measured prefill latency (timing.repeats=0)")
    timed = picked.dropna(subset=["prefill_ms"])
    if len(timed):
        places = zip(column(timed, "accelerator"), timed["device"])
        where = sorted({a if isinstance(a, str) else str(d) for a, d in places})
        batch = sorted({int(b) for b in column(timed, "prefill_batch").dropna()})
        notes.append(f"prefill ms: median of timed unshared prefills of {batch} sample(s) on {', '.join(where)}.")
        if column(timed, "prefill_speedup").notna().any():
            notes.append("prefill speedup: each round times the point's prefill and the unmodified model's (no "
                         "engine; vanilla's row is that model; its median is 'vanilla ms, same rounds') back to back "
                         "(which goes first alternates); the median over the rounds of their ratio "
                         "(redundancy.stats.median_ratio), so that a machine whose speed drifts between points "
                         "cancels out: compare speedups across rows, not prefill ms.")
    title = f"Inference comparison: {picked['model'].iloc[0]} on {picked['data'].iloc[0]}"
    return Table(title, frame.reset_index(drop=True), notes)


def lambda_table(
    results: pd.DataFrame, samples: pd.DataFrame | None = None, *, model: str | None = None, data: str | None = None,
    lambdas: Sequence[float] = LAMBDAS, layers: Sequence[int] = (8, 16, 24), ranker: str = "last",
) -> Table:
    """PyramidDrop Table 4: PyramidDrop at each ``lam`` (boundaries ``layers``), with the unmodified
    model first: image-part TFLOPs (and their ratio to vanilla), accuracy overall and per family."""
    rows = rows_of_model(results, model, data, ranker)
    layer_text = ", ".join(str(k) for k in layers)
    points = ["vanilla", *(f"pdrop layers=[{layer_text}] lam={lam}" for lam in lambdas)]
    picked = pick_points(rows, points, "lambda table")
    van = picked[picked["method"] == "vanilla"]
    base = float(van["image_tflops"].iloc[0]) if len(van) else None
    lam = column(picked, "params.lam").rename("lambda")
    frame = pd.concat([picked[["point"]].rename(columns={"point": "method"}), lam, cost_columns(picked, base),
                       accuracy_columns(picked), paired_columns(picked, samples)], axis=1)
    title = (f"PyramidDrop lambda at inference (the paper's Table 4 ablates lambda in training): "
             f"{picked['model'].iloc[0]} on {picked['data'].iloc[0]}")
    return Table(title, frame.reset_index(drop=True), flops_note(picked) + paired_note(frame))


# ------------------------------------------------------------------ from checkpoint cards
def load_card(name_or_dir: str | Path) -> dict[str, Any]:
    """``card.json`` of a checkpoint directory, or of a shipped checkpoint by name."""
    path = Path(name_or_dir) / "card.json"
    if not path.is_file():
        from redundancy.loading import SHIPPED  # late: it imports torch, which nothing else here needs

        path = SHIPPED / str(name_or_dir) / "card.json"
    if not path.is_file():
        raise FileNotFoundError(f"no model card at {path}")
    return json.loads(path.read_text(encoding="utf-8"))


def training_row(card: dict[str, Any]) -> dict[str, Any]:
    wall = card.get("training_wall_s", {})
    test = card.get("test_accuracy", {})
    train = card.get("train_config", {})
    # A run started from another run's stage (init_from, start_stage) carries that run's
    # earlier stages in its card: "these stages" are the ones this run trained.
    names = list(wall)
    start = train.get("start_stage")
    trained = names[names.index(start):] if start in names else names
    row: dict[str, Any] = {
        "checkpoint": card["name"],
        "training": train.get("method", "?"),
        "stages trained": " ".join(trained) or "?",
        "started from": train.get("init_from") or "scratch",
        "wall min (these stages)": sum(wall[s] for s in trained) / 60 if trained else math.nan,
        "wall min (all stages)": sum(wall.values()) / 60 if wall else math.nan,
        "wall min (final stage)": wall["final"] / 60 if "final" in wall else math.nan,
        "device": f"{card.get('train_device', '?')} x{card.get('train_threads', '?')}",
        "accuracy %": 100 * test["accuracy"] if "accuracy" in test else math.nan,
    }
    for family, acc in test.get("per_family", {}).items():
        row[f"{family} %"] = 100 * acc
    row["n"] = test.get("n", math.nan)
    return row


def training_table(checkpoints: Sequence[str | Path]) -> Table:
    """Training wall time and held-out accuracy of each checkpoint, from its ``card.json``."""
    cards = []
    for name in checkpoints:
        try:
            cards.append(load_card(name))
        except FileNotFoundError as err:
            note_missing(f"training table: {err}")
    if not cards:
        raise NothingToDraw(f"training table: no card.json for any of {list(checkpoints)}")
    frame = pd.DataFrame([training_row(c) for c in cards])
    notes = [("wall min: training wall time from each card's training_wall_s; 'these stages' are the ones the run "
              "trained, 'all stages' add the earlier stages of the run it started from ('started from').")]
    tests = sorted({c.get("test_set", "?") for c in cards})
    notes.append(f"accuracy: unmodified model on {', '.join(tests)} (exact match), from the cards.")
    return Table("Training comparison", frame, notes)


# ------------------------------------------------------------------ writing
def format_value(value: Any, name: str) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if "TFLOPs" in name:
            return f"{value:.4g}"
        if name == "n":
            return str(int(value))
        return f"{value:.2f}" if name in ("vs vanilla", "lambda", "prefill speedup") else f"{value:.1f}"
    return str(value)


def markdown(table: Table) -> str:
    """The table as GitHub Markdown: title, header, rows, notes."""
    head = list(table.frame.columns)
    lines = [f"### {table.title}", "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for _, row in table.frame.iterrows():
        lines.append("| " + " | ".join(format_value(row[c], c) for c in head) + " |")
    lines += ["", *(f"- {n}" for n in table.notes)] if table.notes else []
    return "\n".join(lines) + "\n"


def write_table(table: Table, name: str, folder: str | Path) -> list[Path]:
    """``<folder>/<name>.md`` and ``<folder>/<name>.csv``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md, csv = folder / f"{name}.md", folder / f"{name}.csv"
    md.write_text(markdown(table), encoding="utf-8")
    table.frame.to_csv(csv, index=False)
    return [md, csv]
