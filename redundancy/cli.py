"""What every entry point does with its Hydra config: check the command line, make it typed, run, report.

    @hydra.main(version_base="1.3", config_path="conf/flops", config_name="flops")
    def main(cfg: DictConfig) -> None:
        run_entry(run, cfg)

    if __name__ == "__main__":
        launch(main, "flops")

Bad user input (a misspelt key, a value out of range, an unwritable folder, a broken weights
file) becomes one ``error: ...`` line on stderr and exit code 2, before any model loads
(:mod:`redundancy.validate`); tracebacks are left for bugs.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from redundancy.schedule import METHOD_SPECS
from redundancy.validate import check_command_line, fail

CONF = Path(__file__).resolve().parent / "conf"  # one folder per command: conf/<command>/<command>.yaml
# The `method` config group of every command (`method=pdrop method.lam=0.4`): one typed spec per method.
for _name, _spec in METHOD_SPECS.items():
    ConfigStore.instance().store(group="method", name=_name, node=_spec)
# Bad input the commands report in one line: ValueError (redundancy.validate.UsageError among
# them) and what the file system says (a folder that cannot be written, a file that is gone).
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, OSError)


SHORTHANDS = ("layer", "ratio", "K", "R", "layers", "lam")
"""Method parameters every command with a ``method`` group also takes bare: ``lam=0.4`` is
``method.lam=0.4`` (unless the command's own config has a key of that name, as the sweep's
``layer`` / ``ratio`` and the bench's per-method keys)."""


def expand_shorthands(argv: list[str], config_name: str) -> list[str]:
    """``argv`` with every shorthand (:data:`SHORTHANDS`) written as its ``method.`` key, for a command
    whose primary config selects a ``method``; other commands' arguments are returned as they are."""
    has_method, native = _config_keys(CONF / config_name, config_name)
    if not has_method:
        return argv
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out.append(f"method.{key}={value}" if sep and key in SHORTHANDS and key not in native else arg)
    return out


def _config_keys(folder: Path, name: str) -> tuple[bool, set[str]]:
    """Whether the config ``folder/name.yaml`` (with the configs of its folder it builds on) selects a
    ``method``, and its top-level keys."""
    path = folder / f"{name}.yaml"
    if not path.is_file():
        return False, set()
    config = OmegaConf.load(path)
    assert isinstance(config, DictConfig), f"{path}: a command's config is a mapping"
    has_method, keys = False, {str(k) for k in config.keys()}
    for entry in config.get("defaults") or []:
        if isinstance(entry, DictConfig):
            has_method |= "method" in entry
        elif isinstance(entry, str) and entry != "_self_":
            parent_method, parent_keys = _config_keys(folder, entry)
            has_method, keys = has_method or parent_method, keys | parent_keys
    return has_method, keys


def launch(main: Callable[[], None], config_name: str, check: Callable[[Any], object] | None = None) -> None:
    """Check the command line (``sys.argv``, method shorthands expanded: :func:`expand_shorthands`)
    against the typed config ``conf/<config_name>/`` (and with ``check``, the entry point's own
    checks of it), then run the Hydra ``main``."""
    sys.argv[1:] = expand_shorthands(sys.argv[1:], config_name)
    check_command_line(CONF / config_name, config_name, sys.argv[1:], check)
    main()


def run_entry(
    run: Callable[[Any], str], cfg: DictConfig, errors: tuple[type[Exception], ...] = USER_ERRORS
) -> None:
    """Convert ``cfg`` to its registered dataclass, print ``run(typed)``; bad user input
    (``errors``) becomes one ``error: ...`` line on stderr and exit code 2, no traceback."""
    try:
        typed = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        fail(str(err).splitlines()[0])
    try:
        print(run(typed))
    except errors as err:
        fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
