"""Concurrent sweeps into one folder split the points (redundancy.locks), and a point's result
key comes from the content of what was evaluated, never from a path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from redundancy import sweep
from redundancy.locks import PointLocks
from redundancy.results import load_results
from tests.helpers import tiny

OTHER_PROCESS = """
import sys, time
from redundancy.locks import PointLocks
other = PointLocks(sys.argv[1])
print(other.claim("a"), other.claim("b"), flush=True)
other.release()
t0 = time.monotonic()
other.wait(["a"])  # returns once the first process releases "a"
print(round(time.monotonic() - t0, 1), other.claim("a"), flush=True)
"""


def test_a_claimed_point_is_refused_until_released(tmp_path: Path) -> None:
    mine = PointLocks(tmp_path)
    assert mine.claim("a") and mine.claim("a")  # a process's own claim holds
    other = subprocess.Popen([sys.executable, "-c", OTHER_PROCESS, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert other.stdout is not None
    assert other.stdout.readline().split() == ["False", "True"]  # "a" is held here, "b" is free
    time.sleep(1.0)
    mine.release()
    waited, claimed = other.stdout.readline().split()
    assert other.wait(timeout=60) == 0
    assert float(waited) >= 0.5 and claimed == "True"  # it waited while "a" was held, then took it
    assert PointLocks(tmp_path, enabled=False).claim("b")  # data-parallel processes: no locks


@pytest.mark.slow
def test_concurrent_sweeps_split_the_points(tiny_dir: Path, tmp_path: Path,  # noqa: F811
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The second sweep starts while the first holds layers 1 and 2: it evaluates only layer 3,
    waits for layer 2 and reports it as the other sweep's."""
    out = tmp_path / "out"
    first = tiny(tiny_dir, out, "layer=[1,2]", "ratio=0.1", "reference=false")
    second = tiny(tiny_dir, out, "layer=[2,3]", "ratio=0.1", "reference=false")
    evaluated: dict[str, list[int]] = {}
    summaries: dict[str, str] = {}
    real_run_grid = sweep.run_grid

    def run_grid(model: Any, processor: Any, samples: Any, schedules: Any, **kwargs: Any) -> Any:
        name = threading.current_thread().name
        evaluated[name] = sorted(s.boundaries[0] for s in schedules)
        if name == "first":  # the second sweep runs while this one holds its points
            other = threading.Thread(target=lambda: summaries.update(second=sweep.run(second)), name="second")
            other.start()
            deadline = time.monotonic() + 300
            while not any(row["layer"] == 3 for row in load_results(out).to_dict("records")) and other.is_alive():
                assert time.monotonic() < deadline
                time.sleep(0.2)
            summaries["thread"] = other  # type: ignore[assignment]
        return real_run_grid(model, processor, samples, schedules, **kwargs)

    monkeypatch.setattr(sweep, "run_grid", run_grid)
    runner = threading.Thread(target=lambda: summaries.update(first=sweep.run(first)), name="first")
    runner.start()
    runner.join(timeout=600)
    summaries["thread"].join(timeout=600)  # type: ignore[attr-defined]
    assert evaluated == {"first": [1, 2], "second": [3]}
    assert sorted(load_results(out)["layer"]) == [1, 2, 3]
    line = next(x for x in summaries["second"].splitlines() if x.startswith("drop layer=2"))
    assert line.endswith("other sweep")


@pytest.mark.slow
def test_a_copy_of_a_checkpoint_is_the_same_point(tiny_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    copy = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tiny_dir, copy)
    out = tmp_path / "out"
    sweep.run(tiny(tiny_dir, out, "layer=2", "ratio=0.1"))
    again = sweep.run(tiny(copy, out, "layer=2", "ratio=0.1"))  # another path, another model label
    assert len(load_results(out)) == 1
    assert next(x for x in again.splitlines() if x.startswith("drop layer=2")).endswith("done before")
