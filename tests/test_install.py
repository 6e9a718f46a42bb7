"""A non-editable install carries every command's configs (issue 31): ``pip install .`` into a fresh
virtual environment, then ``python -m redundancy.sweep`` from another directory runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_runs_the_sweep_from_another_directory(tmp_path: Path) -> None:
    # Install from a copy of the project's package files, so that the build leaves nothing in the checkout.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "redundancy", source / "redundancy", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    # --without-pip: the venv runs the pip and setuptools it sees in the system (ensurepip's bundled
    # setuptools is older than the one pyproject.toml builds with, and the build is offline).
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", str(source)],
                   check=True, capture_output=True)
    shutil.rmtree(source)  # the installed copy alone

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    where = subprocess.run([python, "-c", "import redundancy; print(redundancy.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed package, not a checkout
    out = tmp_path / "out"
    run = subprocess.run([python, "-m", "redundancy.sweep", "layer=16", "ratio=0.1", "data.limit=2", f"out={out}",
                          "progress=false"], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert list(out.rglob("*.jsonl")), sorted(p.name for p in out.rglob("*"))
