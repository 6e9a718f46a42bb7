"""Fixtures and hooks for every test; the shared builders are in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers import save_tiny_micro


@pytest.fixture(autouse=True, scope="session")
def single_thread() -> Any:
    """Tiny matrices gain nothing from intra-op threads, and OpenMP threads that
    spin against other processes on a small CPU slow every op ~100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny micro-LLaVA saved once per test module (tests.helpers.save_tiny_micro)."""
    return save_tiny_micro(tmp_path_factory.mktemp("tiny-micro"))
