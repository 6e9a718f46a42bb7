"""The notebooks run top to bottom on the committed results (notebooks/, results/)."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
RESULTS = ROOT / "results"


def test_the_three_notebooks_are_committed_clean() -> None:
    assert [p.stem for p in NOTEBOOKS] == ["attention_maps", "flops_tradeoff", "redundancy_study"]
    for path in NOTEBOOKS:  # stored without outputs, so diffs show code only
        cells = nbformat.read(path, as_version=4).cells
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in cells if c.cell_type == "code")


def test_results_are_committed() -> None:
    assert any((RESULTS / "sweep" / "points").glob("*.json")), "no result rows in results/sweep (run the studies)"
    assert any((RESULTS / "maps").glob("*.npz")), "no attention-map artefact in results/maps (run redundancy.maps)"


@pytest.mark.slow  # a kernel per notebook: 5-15 s each on a small CPU
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    kinds = {key for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs
             for key in out.get("data", {})}
    assert "image/png" in kinds  # the figures were drawn
