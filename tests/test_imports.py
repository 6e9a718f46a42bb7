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
    from tests.helpers import tiny_model

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
    assert found == [], found


def test_no_module_reaches_for_another_modules_private_names() -> None:
    """No module of the package or the tests imports another module's underscore names or reaches
    one through an object in the package (``engine._run_layers``: issue 31 made the engine's layer
    runner public, ``DropEngine.run_layers``), and tests take shared helpers from tests/helpers.py, never from
    conftest (pytest's, not a module to import)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    paths = sorted([*(root / "redundancy").rglob("*.py"), *(root / "tests").glob("*.py")])
    trees = {path: ast.parse(path.read_text()) for path in paths}
    private = {path: {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))
                      and n.name.startswith("_") and not n.name.startswith("__")} for path, tree in trees.items()}
    everywhere = set().union(*private.values())
    found = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("redundancy", "tests"):
                found += [
                    f"{path.name}: from {node.module} import {a.name}" for a in node.names if a.name.startswith("_")
                ]
                if node.module.endswith("conftest"):
                    found.append(f"{path.name}: from {node.module} import ...")
            elif (isinstance(node, ast.Attribute) and node.attr in everywhere - private[path]
                    and isinstance(node.value, ast.Name) and node.value.id not in ("self", "cls")
                    and path.relative_to(root).parts[0] == "redundancy"):  # white-box tests may probe internals
                found.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert found == [], found
