"""What every entry point does with its Hydra config: make it typed, run, report."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf


def run_entry(
    run: Callable[[Any], str], cfg: DictConfig, errors: tuple[type[Exception], ...] = (ValueError,)
) -> None:
    """Convert ``cfg`` to its registered dataclass, print ``run(typed)``; bad user input
    (``errors``) becomes one ``error: ...`` line on stderr and exit code 2, no traceback."""
    typed = OmegaConf.to_object(cfg)
    try:
        print(run(typed))
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
