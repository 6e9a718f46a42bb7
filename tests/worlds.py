"""Synthetic result stores whose verdicts are known by construction (tests only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from redundancy.schedule import DropSchedule


def rankers_world(root: Path, *, spatial_counts: bool = True, bottom_wins: bool = True, sinks: int = 2) -> Path:
    """A rankers-study store on the shipped test set's 600 questions (its evidence positions) for both
    shipped models at layers 2 and 16, r=0.1, built so each critique's verdict is known: ``last`` keeps
    12 of its 14 tokens in the bottom half (``norope`` 7), one of them a sink; it answers every question
    except the top-evidence ones (``bottom_wins``; else except the bottom-evidence ones), as do ``nosink``,
    ``random`` (5 seeds), ``uniform`` and ``pool``; ``mean``, ``norope`` and vanilla answer all.
    ``spatial_counts=False``: rows and records written before the spatial diagnostics."""
    from redundancy.data import QUESTIONS_FILE, evidence_positions
    from redundancy.loading import TEST_SET
    from redundancy.results import ResultStore, fingerprint
    from redundancy.spatial import question_numbers, summarise

    positions = evidence_positions(TEST_SET)
    ids = list(positions)
    lost = "top" if bottom_wins else "bottom"
    store, data_id = ResultStore(root), fingerprint([TEST_SET / QUESTIONS_FILE])
    bottom_cells = {"last": 12, "norope": 7}

    def entry(ranker: str) -> dict[str, Any]:
        grid = np.zeros(144, int)
        low = bottom_cells.get(ranker, 7)
        grid[144 - low:] = 1  # the last cells: bottom rows
        grid[: 14 - low] = 1
        return {"image": {"grids": {"12x12": [1] * 144}, "tokens": 144}, "layers": [2],
                "boundaries": [{"grids": {"12x12": grid.tolist()}, "tokens": 14, "sinks": min(1, sinks),
                                "sinks_present": sinks}]}

    def add(model: str, schedule: DropSchedule, right: np.ndarray) -> None:
        key = f"{model}-{schedule.method}-{schedule.ranker}-{len(store.rows())}"
        layer = schedule.boundaries[0] if schedule.boundaries else None
        place = entry(schedule.ranker) if layer is not None and spatial_counts else None
        records = [{"question_id": q, "family": "color", "score": float(v), "correct": bool(v),
                    "kept": [144, 14] if layer else [144], **(question_numbers(place) if place else {})}
                   for q, v in zip(ids, right)]
        store.finish(key, {
            "key": key, "created": "2026-01-01T00:00:00", "model": model, "data": "microvqa", "data_id": data_id,
            "point": label(schedule), "method": schedule.method, "layer": layer,
            "ratio": schedule.ratios[0] if layer else None, "boundaries": list(schedule.boundaries),
            "ranker": schedule.ranker, "rank_layer": schedule.rank_layer, "positions": schedule.positions,
            "n": len(ids), "accuracy": float(right.mean()), "ci_low": 0.0, "ci_high": 1.0, "ci_level": 0.95,
            "image_tflops": 1.0, "full_tflops": 2.0, "prefill_ms": None, "avg_image_tokens": 14.0,
            "per_family": {"color": float(right.mean())}, "params": schedule.params, "seed": schedule.seed,
            "spatial": summarise([place] * len(ids)) if place else None,
        }, records)

    everything = np.ones(len(ids))
    loses = np.array([positions[q] != lost for q in ids], float)
    for model in ("micro-llava-vanilla", "micro-llava-pdrop"):
        add(model, DropSchedule.vanilla(), everything)
        for layer in (2, 16):
            for ranker in ("last", "nosink", "uniform", "pool"):
                add(model, DropSchedule.drop(layer, 0.1, ranker=ranker), loses)
            for ranker in ("mean", "norope"):
                add(model, DropSchedule.drop(layer, 0.1, ranker=ranker), everything)
            for seed in range(5):
                add(model, DropSchedule.drop(layer, 0.1, ranker="random").seeded("c", seed), loses)
    return root


def label(schedule: DropSchedule) -> str:
    params = " ".join(f"{k}={v}" for k, v in schedule.params.items())
    return f"{schedule.method} {params}".strip()
