"""Data-parallel sweeps (redundancy/distributed.py): two CPU processes give the rows of one.

The processes are started by ``torch.distributed.run``, the launcher ``accelerate launch
--num_processes N`` runs on GPUs; accelerate's ``PartialState`` joins them (gloo on the CPU).
``accelerate launch --cpu`` starts a single process unless MPI is set up, so it is not used here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from redundancy import sweep
from redundancy.distributed import Processes
from tests.helpers import ROOT, save_tiny_micro, tiny

# may differ between runs
TIMING = {"created", "wall_s", "seconds", "prefill_ms", "prefill_vanilla_ms", "prefill_speedup", "processes", "threads"}


def test_shard_takes_every_worlds_batch() -> None:
    items = list(range(10))
    shards = [Processes(rank=r, world=2).shard(items, 3) for r in range(2)]
    assert shards == [[0, 1, 2, 6, 7, 8], [3, 4, 5, 9]]
    assert Processes().shard(items, 3) == items


def _launch(out: Path, model: Path, cwd: Path) -> str:
    overrides = [f"model.path={model}", "model.num_layers=null", "data.limit=8", "batch_size=4", f"out={out}",
                 "timing.repeats=0", "progress=false", "threads=1", "layer=2", "ratio=[0.25,0.5]", "reference=false"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "redundancy.sweep", *overrides]
    done = subprocess.run(cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _files(out: Path) -> dict[str, Any]:
    """Every row and per-sample record under ``out``, fields that time things left out."""
    rows = {}
    for p in sorted((out / "points").glob("*.json")):
        row = {k: v for k, v in json.loads(p.read_text()).items() if k not in TIMING}
        row["config"] = {**row["config"], "out": None}
        rows[p.stem] = row
    samples = {p.stem: [{k: v for k, v in json.loads(line).items() if k not in TIMING}
                        for line in p.read_text().splitlines()]
               for p in sorted((out / "samples").glob("*.jsonl"))}
    return {"rows": rows, "samples": samples}


def test_two_processes_write_the_rows_of_one(tmp_path: Path) -> None:
    model = save_tiny_micro(tmp_path / "tiny")
    single, parallel = tmp_path / "single", tmp_path / "parallel"
    sweep.run(tiny(model, single, "data.limit=8", "layer=2", "ratio=[0.25,0.5]", "reference=false", "threads=1"))

    first = _launch(parallel, model, tmp_path)
    assert "2 new, 0 done before" in first and "process 1 of 2: 4 of 8 questions" in first
    expected, got = _files(single), _files(parallel)
    assert len(got["rows"]) == 2 and set(got["rows"]) == set(expected["rows"])
    assert got == expected  # same keys, accuracy, n, CI, FLOPs, per-sample predictions and scores
    assert all(json.loads(p.read_text())["processes"] == 2 for p in (parallel / "points").glob("*.json"))
    assert not list((parallel / "partial").glob("*"))  # every shard's partial file was gathered and removed

    before = {p: p.stat().st_mtime_ns for p in parallel.rglob("*") if p.is_file()}
    again = _launch(parallel, model, tmp_path)
    assert "0 new, 2 done before" in again
    assert {p: p.stat().st_mtime_ns for p in parallel.rglob("*") if p.is_file()} == before
