"""Every entry point answers bad input with one ``error:`` line and exit code 2, before any model
is built and without writing anything (redundancy.validate, redundancy.cli).

Each entry point runs in its own Python process (``OMP_NUM_THREADS=1``) that executes the
command once per case, as ``python -m redundancy.<entry> <args>`` does (``runpy``), in an empty
folder of its own, with ``PreTrainedModel.__init__`` replaced by a tripwire: a case that builds
any model (loaded or random-init) fails. One real ``python -m`` run per kind of check confirms the process exit code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from redundancy.loading import SHIPPED

ROOT = Path(__file__).resolve().parents[1]
CPU_BUILD = not torch.cuda.is_available()

# Runs each case of argv[1] (a JSON list of [folder, module, args]) as `python -m module args`
# in that folder; prints one JSON record per case: exit code, stderr, files left in the folder.
RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback
from transformers.modeling_utils import PreTrainedModel

def tripwire(*args, **kwargs):
    raise RuntimeError("a model was built")

PreTrainedModel.__init__ = tripwire
records = []
for folder, module, args in json.loads(sys.argv[1]):
    os.chdir(folder)
    sys.argv = [module, *args]
    err = io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    records.append({"code": code, "stderr": err.getvalue(), "files": sorted(os.listdir(folder))})
print("RECORDS " + json.dumps(records))
"""


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def broken(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths that exist but cannot serve: a regular file (as a parent folder) and a copy of the
    shipped checkpoint whose weights file is cut in half."""
    root = tmp_path_factory.mktemp("broken")
    afile = root / "afile"
    afile.write_text("not a folder")
    model = root / "truncated-model"
    shutil.copytree(SHIPPED / "micro-llava-vanilla", model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return {"file": str(afile), "truncated": str(model)}


def _cases(broken: dict[str, str]) -> dict[str, list[tuple[list[str], str]]]:
    """Per entry point: (arguments, text the one error line must hold)."""
    f, bad = broken["file"], broken["truncated"]
    cuda = ["device=cuda"] if CPU_BUILD else []  # refused on a CPU build of torch
    return {
        "redundancy.sweep": [
            (["foo=1"], "unknown key 'foo'"),
            (["ration=0.1"], "did you mean 'ratio'"),
            (["method.ratoi=0.1"], "did you mean 'method.ratio'"),
            (["+foo=1"], "unknown key 'foo'"),
            (["method=nonexistent"], "method=nonexistent is unknown"),
            (["batch_size=abc"], "batch_size=abc"),
            (["layer=2,8"], "add -m"),
            (["model=llava-1.5"], "model.path must be given"),
            (["layer=40", "out=out"], "[1, 31]"),
            (["ratio=1.5", "out=out"], "[0, 1]"),
            ([f"out={f}/sweep"], "cannot be written"),
            (["-m", "layer=2,8", f"out={f}/sweep"], "cannot be written"),
            ([f"model.path={bad}", "out=out", "data.limit=2", "timing.repeats=0"], "model.safetensors is truncated"),
            *[([f"model.{a}", "out=out"], "CPU build") for a in cuda],
        ],
        "redundancy.flops": [
            (["modle=llava-next-7b"], "did you mean 'model'"),
            (["method=pdrop", "method.lamm=0.4"], "did you mean 'method.lam'"),
            (["+foo=1"], "unknown key 'foo'"),
            (["method=nonexistent"], "method=nonexistent is unknown"),
            (["method=pdrop", "budget=100"], "budget=100.0 TFLOPs is unreachable"),
            (["method=pdrop", "budget=0.1"], "budget=0.1 TFLOPs is unreachable"),
            (["method=fastv", "method.K=0"], "K=0: boundary 0 is outside the allowed range [1, 31]"),
        ],
        "redundancy.bench": [
            (["threads=-3"], "threads=-3"),
            (["threads=0"], "threads=0"),
            (["checkpoint=micro-llava-vanilla", "preset=micro"], "give one"),
            (["batch_size=100000"], "needs at least"),
            (["checkpoint=micro-llava-vanilla", "batch_size=100000"], "600 test questions"),
            (["chekpoint=micro-llava-vanilla"], "did you mean 'checkpoint'"),
            ([f"out={f}/bench.json"], "cannot be written"),
            ([f"checkpoint={bad}"], "model.safetensors is truncated"),
            (["K=0"], "boundary 0"),
            *[([a], "CPU build") for a in cuda],
        ],
        "redundancy.maps": [
            (["modle=micro-llava-pdrop"], "did you mean 'model'"),
            ([f"out={f}/maps"], "cannot be written"),
            ([f"model={bad}", "out=out", "questions=[test-000000]"], "model.safetensors is truncated"),
            *[([a, "out=out"], "CPU build") for a in cuda],
        ],
        "redundancy.health": [
            (["modle=micro-llava-pdrop"], "did you mean 'model'"),
            (["n=0"], "n=0 must be at least 1"),
            ([f"out={f}/health"], "cannot be written"),
            ([f"model={bad}", "out=out"], "model.safetensors is truncated"),
            *[([a, "out=out"], "CPU build") for a in cuda],
        ],
        "redundancy.figures": [
            (["dpii=3"], "did you mean 'dpi'"),
            ([f"results={f}"], "cannot be written"),
        ],
        "redundancy.micro.train": [
            (["method=pdrop", "method.lamm=0.3"], "did you mean 'method.lam'"),
            (["threads=-1", "out=run"], "threads=-1"),
            ([f"out={f}/run"], "cannot be written"),
            (["stages.3.extra=1"], "did you mean 'stages.3.extras'"),
            *[([a, "out=run"], "CPU build") for a in cuda],
        ],
    }


def _run_cases(module: str, cases: list[tuple[list[str], str]], tmp_path: Path) -> list[dict[str, Any]]:
    folders = []
    for i, _ in enumerate(cases):
        folders.append(tmp_path / f"case{i}")
        folders[-1].mkdir()
    spec = [[str(d), module, args] for d, (args, _) in zip(folders, cases)]
    proc = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(spec)], capture_output=True, text=True,
                          env=_env(), cwd=tmp_path, timeout=600, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RECORDS ")]
    assert lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RECORDS "))


@pytest.mark.parametrize("module", ["redundancy.sweep", "redundancy.flops", "redundancy.bench", "redundancy.maps",
                                    "redundancy.health", "redundancy.figures", "redundancy.micro.train"])
def test_bad_input_is_one_line_and_exit_code_2(module: str, broken: dict[str, str], tmp_path: Path) -> None:
    cases = _cases(broken)[module]
    for (args, expected), record in zip(cases, _run_cases(module, cases, tmp_path)):
        lines = [line for line in record["stderr"].splitlines() if line.strip()]
        where = f"python -m {module} {' '.join(args)}"
        assert record["code"] == 2, (where, record["stderr"][-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: "), (where, lines)
        assert expected in lines[0], (where, lines[0])
        assert record["files"] == [], (where, record["files"])


@pytest.mark.parametrize(("module", "args", "expected"), [
    ("redundancy.flops", ["modle=llava-next-7b"], "did you mean 'model'"),  # caught before Hydra runs
    ("redundancy.flops", ["method=pdrop", "budget=100"], "unreachable"),  # caught in the command
])
def test_the_process_exits_with_code_2(module: str, args: list[str], expected: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and expected in proc.stderr
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


def test_valid_multirun_and_group_overrides_pass_the_check(tmp_path: Path) -> None:
    """The check leaves valid commands alone: group choices, multirun sweeps, dict additions, --cfg."""
    import redundancy.micro.train  # noqa: F401
    import redundancy.sweep  # noqa: F401  (registers the schemas)
    from redundancy.cli import CONF
    from redundancy.validate import check_command_line

    check_command_line(CONF / "sweep", "sweep", ["-m", "method=fastv", "method.K=2,8", f"out={tmp_path}/s"])
    check_command_line(CONF / "sweep", "sweep", ["experiment=redundancy", "hydra/launcher=slurm",
                                                 "hydra.launcher.partition=gpu"])
    check_command_line(CONF / "train", "train", ["+stages.3.extras.side=1.0", f"out={tmp_path}/t"])
    check_command_line(CONF / "train", "train", ["--cfg", "job", "whatever=1"])  # Hydra's own flags: left to Hydra
    assert list(tmp_path.iterdir()) == []
