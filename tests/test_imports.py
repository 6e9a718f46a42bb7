"""Starting a command is cheap (issue 32): importing the sweep, the bench's engine or the grid
loads no modelling, image-processing or statistics library; they load on first use."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("transformers.modeling_utils", "transformers.image_processing_utils", "transformers.processing_utils",
         "pandas", "scipy", "statsmodels")


@pytest.mark.parametrize("module", ["redundancy.sweep", "redundancy.engine", "redundancy.grid"])
def test_import_loads_no_heavy_library(module: str) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"import {module} loads {loaded}"


def test_engine_registers_its_attention_on_first_attach() -> None:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from redundancy.engine import apply_schedule
    from redundancy.schedule import DropSchedule
    from tests.conftest import tiny_model

    with apply_schedule(tiny_model("llava", "llama", "sdpa"), DropSchedule.fastv(K=2, R=0.5)):
        assert "redundancy" in ALL_ATTENTION_FUNCTIONS


def test_only_the_micro_wing_imports_the_micro_wing() -> None:
    """The micro-LLaVA (benchmark generator, model, training, export) is one subpackage the harness
    never imports (issue 31): no module outside ``redundancy/micro/`` names ``redundancy.micro``."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[1] / "redundancy"
    found = []
    for path in sorted(package.rglob("*.py")):
        if "micro" in path.relative_to(package).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(package)}: {n}" for n in names if n.split(".")[:2] == ["redundancy", "micro"]]
    assert (package / "micro" / "__init__.py").is_file()
    assert found == []
