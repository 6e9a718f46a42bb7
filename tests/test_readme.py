"""The README is a short guide whose study table is the generated one, and every command it and
the docs name exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDES = [ROOT / "README.md", ROOT / "results" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
          ROOT / "experiments" / "README.md"]
START, END = "<!-- claims: spliced from results/claims.md -->", "<!-- /claims -->"


def test_readme_is_a_short_guide() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_readme_claims_table_is_the_generated_one() -> None:
    readme = (ROOT / "README.md").read_text()
    claims = (ROOT / "results" / "claims.md").read_text()
    spliced = readme[readme.index(START) + len(START):readme.index(END)].strip()
    generated = [line for line in claims.splitlines() if line.startswith("|")]
    table = [line for line in spliced.splitlines() if line.startswith("|")]
    assert table, "the README holds no claims table between its markers"
    assert table == generated[:len(table)] and len(table) == len(_first_table(claims))


def _first_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| # |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_module_command_exists(guide: Path) -> None:
    modules = set(re.findall(r"python -m (redundancy(?:\.\w+)+)", guide.read_text()))
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    assert not missing, f"{guide.name} names commands that do not exist: {missing}"


@pytest.mark.parametrize("guide", GUIDES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_documented_repository_path_exists(guide: Path) -> None:
    text = guide.read_text()
    paths = set(
        re.findall(
            r"`((?:redundancy|conf|docs|results|experiments|tools|notebooks|tests)/[\w./-]+\.(?:py|md|yaml|ipynb))`",
            text,
        )
    )
    missing = sorted(p for p in paths if not (ROOT / p).exists() and not (guide.parent / p).exists())
    assert not missing, f"{guide.name} names files that do not exist: {missing}"
