"""Choosing and reshaping result rows for the figures and tables (pandas only, no drawing).

    rows = latest(select(load_results("results/sweep"), model="micro-llava-vanilla", data="microvqa"))
    long = accuracy_long(rows, load_samples("results/sweep"))  # one row per (point, family)

Rows are those of :func:`redundancy.results.load_results`. What a figure needs but the results do
not hold is reported with :func:`note_missing` (a :class:`MissingInput` warning); nothing is ever
filled in. A figure with nothing at all to draw raises :class:`NothingToDraw`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import pandas as pd

from redundancy.schedule import METHOD_SPECS, DropSchedule
from redundancy.stats import confidence_interval

OVERALL = "overall"
FAMILY_PREFIX = "per_family."
# What makes two rows the same point of a figure; among such rows the one with the most
# questions (then the newest) is drawn, e.g. a full run over an earlier `data.limit` run.
POINT_IDENTITY = ("model", "data", "point", "ranker", "rank_layer", "positions")


class MissingInput(UserWarning):
    """Rows that a figure or table would show are not in the results."""


class NothingToDraw(ValueError):
    """A figure or table has no rows at all to show."""


def note_missing(message: str) -> None:
    warnings.warn(message, MissingInput, stacklevel=2)


def official_options(method: str) -> dict[str, str]:
    """The method's own choice of ranking layer and position policy (its default spec's schedule)."""
    ranked = [m for m in METHOD_SPECS if m != "vanilla"]
    if method not in ranked:
        raise ValueError(f"method={method!r} has no ranking options; choose one of {ranked}")
    s = DropSchedule.from_spec(METHOD_SPECS[method]())
    return {"rank_layer": s.rank_layer, "positions": s.positions}


def select(
    rows: pd.DataFrame, *, model: str | None = None, data: str | None = None, method: str | None = None,
    ranker: str | Sequence[str] | None = None, official: bool = True,
) -> pd.DataFrame:
    """The rows of ``model`` on ``data`` (and ``method``, ``ranker``: one name or several).

    ``official``: ranked rows only with their method's own ranking layer and position policy
    (the variants of the controls study stay out of the method curves). Vanilla rows always pass
    the ranker and ``official`` filters.
    """
    if rows.empty:
        return rows
    keep = pd.Series(True, index=rows.index)
    for column, value in (("model", model), ("data", data), ("method", method)):
        if value is not None:
            keep &= rows[column] == value
    vanilla = rows["method"] == "vanilla"
    if ranker is not None:
        names = [ranker] if isinstance(ranker, str) else list(ranker)
        keep &= vanilla | rows["ranker"].isin(names)
    if official:
        for m in set(rows.loc[keep & ~vanilla, "method"]):
            opts = official_options(m)
            unofficial = (rows["rank_layer"] != opts["rank_layer"]) | (rows["positions"] != opts["positions"])
            other = (rows["method"] == m) & unofficial
            keep &= ~other
    return rows[keep].copy()


def latest(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per point (:data:`POINT_IDENTITY`): the one with the most questions, then the newest.
    Rows evaluated on fewer questions than the largest evaluation (a ``data.limit`` trial) are
    refused, and reported: a panel compares points on the same questions only."""
    if rows.empty:
        return rows
    ordered = rows.sort_values(["n", "created"], ascending=[False, False], kind="stable")
    out = ordered.drop_duplicates(subset=list(POINT_IDENTITY), keep="first")
    panel_n = int(out["n"].max())
    refused = out[out["n"] != panel_n]
    if len(refused):
        sizes = sorted({int(n) for n in refused["n"]})
        points = ", ".join(sorted(set(refused["point"])))
        note_missing(f"refused {len(refused)} rows evaluated on n={sizes} questions, not the panel's n={panel_n}: "
                     f"{points}")
    return out[out["n"] == panel_n].sort_index()


SEED_SUFFIX = r" seed=\d+$"  # the seed index in a seeded ranker's point label (redundancy.schedule.DropSchedule.seeded)


def average_seeds(long: pd.DataFrame) -> pd.DataFrame:
    """:func:`accuracy_long` rows with the seeds of a seeded ranker averaged into one row per point
    (``accuracy``: the mean over seeds; ``seed_sd``, ``seeds``: their spread and count; no interval,
    the spread across seeds is the control's). Rows of unseeded rankers pass unchanged."""
    if long.empty:
        return long
    base = long["point"].str.replace(SEED_SUFFIX, "", regex=True)
    seeded = base != long["point"]
    if not seeded.any():
        return long
    part = long[seeded].assign(point=base[seeded])
    keys = ["model", "data", "point", "ranker", "rank_layer", "positions", "family"]
    grouped = part.groupby(keys, sort=False, dropna=False)
    out = grouped.first().reset_index()
    out["accuracy"] = grouped["accuracy"].mean().to_numpy()
    out["seed_sd"] = grouped["accuracy"].std().to_numpy()
    out["seeds"] = grouped["accuracy"].size().to_numpy()
    out["ci_low"] = math.nan
    out["ci_high"] = math.nan
    return pd.concat([long[~seeded], out], ignore_index=True)


def rows_of_model(
    results: pd.DataFrame, model: str | None, data: str | None, ranker: str | Sequence[str], official: bool = True,
) -> pd.DataFrame:
    """:func:`select` + :func:`latest` for one model; ``model=None`` takes the only model present."""
    if results.empty:
        raise NothingToDraw("the results are empty")
    if model is None:
        models = sorted(set(results["model"]))
        if len(models) != 1:
            raise ValueError(f"the results hold several models {models}; pass model=")
        model = models[0]
    rows = latest(select(results, model=model, data=data, ranker=ranker, official=official))
    if rows.empty:
        raise NothingToDraw(f"no rows for model {model!r}" + (f" on data {data!r}" if data else ""))
    return rows


def column(rows: pd.DataFrame, name: str) -> pd.Series:
    """Column ``name``, or NaN everywhere when no row recorded it."""
    return rows[name] if name in rows else pd.Series(math.nan, index=rows.index, dtype=float)


def families(rows: pd.DataFrame) -> list[str]:
    """Question families with a per-family accuracy column, in column order."""
    return [c[len(FAMILY_PREFIX):] for c in rows.columns if c.startswith(FAMILY_PREFIX)]


def family_intervals(rows: pd.DataFrame, samples: pd.DataFrame) -> pd.DataFrame:
    """Per (point key, family): ``n`` and the confidence interval of the mean score, from the
    per-sample records (:func:`redundancy.stats.confidence_interval`, each row's own level)."""
    levels = dict(zip(rows["key"], rows["ci_level"]))
    mine = samples[samples["key"].isin(levels)]
    out = []
    for (key, family), group in mine.groupby(["key", "family"], sort=False):
        scores = [float(s) for s in group["score"]]
        low, high, _ = confidence_interval(scores, levels[key])
        out.append({"key": key, "family": family, "ci_low": low, "ci_high": high, "n": len(scores)})
    return pd.DataFrame(out, columns=["key", "family", "ci_low", "ci_high", "n"])


def accuracy_long(rows: pd.DataFrame, samples: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (point, family), ``family`` being ``"overall"`` or a question family, with
    ``accuracy``, ``ci_low``, ``ci_high`` and ``n``. Family intervals and counts come from the
    per-sample records ``samples``; without them they are NaN (drawn without a band)."""
    per_family = [FAMILY_PREFIX + f for f in families(rows)]
    base = rows.drop(columns=per_family)
    parts = [base.assign(family=OVERALL)]
    intervals = family_intervals(rows, samples) if samples is not None and not samples.empty else None
    for column, family in zip(per_family, families(rows)):
        part = base.assign(family=family, accuracy=rows[column], ci_low=math.nan, ci_high=math.nan, n=math.nan)
        if intervals is not None:
            found = intervals[intervals["family"] == family].set_index("key")
            for name in ("ci_low", "ci_high", "n"):
                part[name] = part["key"].map(found[name]).astype(float)
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def panel_families(long: pd.DataFrame, wanted: Sequence[str] | None = None) -> list[str]:
    """``overall`` then the families present (or ``wanted``, in that order; absent ones reported)."""
    present = list(dict.fromkeys(long["family"]))
    if wanted is None:
        return present
    missing = [f for f in wanted if f not in present]
    if missing:
        note_missing(f"no accuracy for families {missing}")
    return [f for f in wanted if f in present]
