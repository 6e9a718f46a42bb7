"""The checks every entry point makes before it does any work: one ``error:`` line, exit code 2.

* :func:`check_command_line`: the Hydra overrides of a command, against the typed config they
  compose (unknown or misspelt keys, ``+key=`` additions the schema has no room for, unknown
  group choices, values of the wrong type, mandatory values left out), each answered with one
  line naming the nearest valid key or choice, before Hydra (or any model) runs.
* :func:`check_writable`: an output folder or file can be written (nothing is created).
* :func:`check_weights`: a model directory's ``config.json`` and safetensors headers are
  readable, the files hold the bytes their headers promise, and the layer count and embedding
  shape in the weights match the config (read from the headers; no tensor is loaded).
* :func:`check_device`, :func:`check_threads`: what the machine can do.

Bad input raises :class:`UsageError` (a ``ValueError``), which :func:`redundancy.cli.run_entry`
prints as one line; :func:`fail` prints it and exits for checks made outside ``run_entry``.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import struct
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

USAGE_EXIT = 2


class UsageError(ValueError):
    """Input the user can fix: reported as one ``error:`` line with exit code 2, no traceback."""


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(USAGE_EXIT)


def nearest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (also by its last dotted part), or None when none is close."""
    pool = sorted(set(candidates))
    found = difflib.get_close_matches(name, pool, n=1, cutoff=0.6)
    if found:
        return found[0]
    tail = name.rsplit(".", 1)[-1]
    by_tail = {c.rsplit(".", 1)[-1]: c for c in pool if c.count(".") == name.count(".")}
    found = difflib.get_close_matches(tail, list(by_tail), n=1, cutoff=0.6)
    return by_tail[found[0]] if found else None


def _suggest(name: str, candidates: Sequence[str]) -> str:
    close = nearest(name, candidates)
    return f"did you mean {close!r}?" if close else f"choose one of {', '.join(sorted(candidates))}"


# ------------------------------------------------------------------ command line
_HYDRA_ONLY = ("help", "hydra_help", "cfg", "info", "shell_completion", "experimental_rerun", "config_path",
               "config_dir")


def check_command_line(config_dir: Path, config_name: str, argv: Sequence[str],
                       check: Callable[[Any], object] | None = None) -> None:
    """Compose ``config_name`` from ``config_dir`` with the overrides in ``argv`` as Hydra would
    and check them against the typed schema; :func:`fail` on the first problem. Hydra's own
    flags (``--help``, ``--cfg``, ``--info``, another config directory) are left to Hydra; of a
    multirun sweep (``-m layer=2,8``) every choice of a config group and the first value of every
    other key are checked. ``check``: the entry point's own checks of the typed config (raising
    ``ValueError`` or ``OSError``), run here too, so that a bad value stops the command before Hydra
    makes its output folder."""
    try:
        message = _command_line_problem(config_dir, config_name, list(argv), check)
    except (ValueError, OSError) as err:
        message = str(err)
    if message:
        fail(message)


def _command_line_problem(config_dir: Path, config_name: str, argv: list[str],
                          check: Callable[[Any], object] | None) -> str | None:
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    args, rest = get_args_parser().parse_known_args(argv)
    if any(getattr(args, flag, None) for flag in _HYDRA_ONLY) or any(a.startswith("-") for a in rest):
        return None  # Hydra answers these itself
    name = args.config_name or config_name
    lines = [*args.overrides, *rest]
    parser = OverridesParser.create()
    for line in lines:
        try:
            parser.parse_overrides([line])
        except HydraException as err:
            return f"{line}: cannot be read ({_first_line(err)})"
    overrides = parser.parse_overrides(lines)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        loader = GlobalHydra.instance().config_loader()
        # repository: on hydra's ConfigLoaderImpl, the loader it always returns, not on the abstract ConfigLoader
        groups = [o for o in overrides if loader.repository.group_exists(o.key_or_group)]  # type: ignore[attr-defined]
        values = [o for o in overrides if o not in groups]
        swept = next((o for o in values if o.is_sweep_override()), None)
        if swept is not None and not args.multirun:
            return (f"{swept.input_line} is a sweep: add -m (--multirun) for one job per value, or give "
                    f"a list ({swept.key_or_group}=[...]) where the command takes one")
        for o in groups:
            options = loader.get_group_options(o.key_or_group)
            for choice in _choices(o):
                if choice not in (None, "null") and choice not in options:
                    return f"{o.key_or_group}={choice} is unknown: {_suggest(str(choice), options)}"
        first = [_first(o) for o in groups]
        try:
            base = compose(config_name=name, overrides=first)
            problem = _unknown_key(base, [o for o in values if not o.key_or_group.startswith("hydra")],
                                   [o.key_or_group for o in groups], name)
            if problem:
                return problem
            cfg = compose(config_name=name, overrides=first + [_first(o) for o in values], return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            return _first_line(err)
    typed = _typed(cfg)
    if isinstance(typed, str):
        return typed
    if check is not None:
        check(typed)
    where = "hydra.sweep.dir" if args.multirun else "hydra.run.dir"
    run_dir = OmegaConf.select(cfg, where, default=None)
    if run_dir not in (None, "."):  # Hydra makes this folder before the command starts
        check_writable(run_dir, where)
    return None


def _typed(cfg: Any) -> Any:
    """The dataclass object of ``cfg`` (without its ``hydra`` node), or the message saying why there is none."""
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        return f"{', '.join(missing)} must be given (e.g. {missing[0]}=<value>)"
    try:
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:
        return _first_line(err)


def _choices(override: Any) -> list[Any]:
    return list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]


def _first(override: Any) -> str:
    """The override line with a sweep replaced by its first value (``layer=2,8`` -> ``layer=2``)."""
    if not override.is_sweep_override():
        return override.input_line
    prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(override.type.name, "")
    package = f"@{override.package}" if override.package else ""
    return f"{prefix}{override.key_or_group}{package}={next(iter(override.sweep_string_iterator()))}"


def _unknown_key(cfg: Any, overrides: Sequence[Any], groups: Sequence[str], name: str) -> str | None:
    """A value override whose key the composed ``cfg`` has no room for, with the nearest valid key."""
    from omegaconf import DictConfig, OmegaConf

    keys = [*_keys(cfg), *groups]
    for o in overrides:
        key = o.key_or_group
        parent_key, _, leaf = key.rpartition(".")
        parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
        exists = OmegaConf.select(cfg, key, default=_ABSENT) is not _ABSENT
        if exists:
            if o.is_add():
                return f"{o.input_line}: {key} is already set; give it without '+' ({key}=...)"
            continue
        if isinstance(parent, DictConfig) and OmegaConf.get_type(parent) is dict:  # a free-form dict field
            if o.is_add() or o.is_force_add():
                continue
            return f"{o.input_line}: {parent_key} has no {leaf!r} yet; add it with +{o.input_line}"
        siblings = [k for k in keys if k.rpartition(".")[0] == parent_key] or keys
        close = nearest(key, keys)
        hint = f"did you mean {close!r}?" if close else f"valid keys{' of ' + parent_key if parent_key else ''}: " + \
            ", ".join(sorted(k.rpartition(".")[2] for k in siblings))
        return f"{o.input_line}: unknown key {key!r} in {name}; {hint}"
    return None


_ABSENT = object()


def _keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every dotted key of ``cfg`` (list items by index)."""
    from omegaconf import DictConfig, ListConfig

    out = []
    items = cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else enumerate(cfg)
    for k, _ in items:
        key = prefix + str(k)
        out.append(key)
        child = cfg._get_node(k)
        if isinstance(child, (DictConfig, ListConfig)) and not child._is_missing() and not child._is_none():
            out += _keys(child, key + ".")
    return out


def _first_line(err: BaseException) -> str:
    """The message of ``err`` (or of the OmegaConf error it wraps) without Hydra's hints."""
    cause = err.__cause__ if err.__cause__ is not None else err
    text = str(cause).strip() or str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    if cause is not err and str(err).strip():
        head = str(err).strip().splitlines()[0]
        if head.lower().startswith("error merging override"):
            line = f"{head.split('override', 1)[1].strip()}: {line}"
    return re.sub(r"\s+", " ", line)


# ------------------------------------------------------------------ files
def check_writable(path: str | Path, key: str, *, is_file: bool = False) -> None:
    """``path`` (a folder, or a file when ``is_file``) can be created or written: its nearest
    existing ancestor is a writable folder (tested by making and removing a temporary file)."""
    target = Path(path)
    folder = target.parent if is_file else target
    if is_file and target.is_dir():
        raise UsageError(f"{key}={path} is a folder; give a file name")
    probe = folder
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"{key}={path} cannot be written: {probe} is not a folder")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as err:
        raise UsageError(f"{key}={path} cannot be written: {probe}: {err.strerror or err}") from None


def _header(file: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file's size."""
    size = file.stat().st_size
    with file.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UsageError(f"{file} is not a safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise UsageError(f"{file} is truncated or corrupt: its header claims {n} bytes, the file has {size}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"{file} is corrupt: its safetensors header is not readable") from None
    if not isinstance(header, dict):
        raise UsageError(f"{file} is corrupt: its safetensors header is not readable")
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        raise UsageError(f"{file} is truncated: {size} bytes, its header describes {need}")
    return header


def check_weights(model_dir: str | Path) -> None:
    """``model_dir``'s config.json is readable and its safetensors files are whole and match it
    (decoder layer count, embedding shape); raise :class:`UsageError` naming the file."""
    root = Path(model_dir)
    config_file = root / "config.json"
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{root} has no config.json (not a Hugging Face model directory)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{config_file} is not readable JSON: {err}") from None
    index = root / "model.safetensors.index.json"
    files = sorted(root.glob("*.safetensors"))
    if index.is_file():
        try:
            listed = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError):
            raise UsageError(f"{index} is not a readable safetensors index") from None
        absent = [name for name in listed if not (root / name).is_file()]
        if absent:
            raise UsageError(f"{index} lists {absent[0]}, which is not in {root}")
    if not files:
        return  # .bin weights: torch reads them itself
    tensors: dict[str, list[int]] = {}
    for file in files:
        tensors.update({k: t.get("shape", []) for k, t in _header(file).items() if k != "__metadata__"})
    text = config.get("text_config", config)
    layers = {int(m.group(1)) for k in tensors if (m := re.search(r"language_model\.(?:model\.)?layers\.(\d+)\.", k))}
    depth = text.get("num_hidden_layers")
    where = files[0] if len(files) == 1 else root
    if layers and depth is not None and max(layers) + 1 != depth:
        raise UsageError(f"{where} holds {max(layers) + 1} decoder layers, {config_file} says {depth}")
    embed = next((shape for k, shape in tensors.items() if k.endswith("embed_tokens.weight")), None)
    want = [text.get("vocab_size"), text.get("hidden_size")]
    if embed is not None and None not in want and list(embed) != want:
        raise UsageError(f"{where} has token embeddings of shape {list(embed)}, {config_file} says {want}")


# ------------------------------------------------------------------ machine
def check_device(device: str, key: str = "device") -> None:
    """``device`` names one torch can use here (``auto`` always can)."""
    import torch

    if device == "auto":
        return
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise UsageError(f"{key}={device!r} is not a device; use auto, cpu or cuda[:N]") from None
    if parsed.type == "cuda":
        if torch.version.cuda is None:
            raise UsageError(f"{key}={device} but this torch ({torch.__version__}) is a CPU build; use {key}=cpu")
        if not torch.cuda.is_available():
            raise UsageError(f"{key}={device} but no CUDA device is visible; use {key}=cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise UsageError(f"{key}={device} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_threads(threads: int | None, key: str = "threads", *, zero_is_default: bool = True) -> None:
    """A torch thread count: positive, or 0 / None for torch's default where allowed."""
    if threads is None or (threads == 0 and zero_is_default):
        return
    if threads < 1:
        default = "leave it out for torch's default" if not zero_is_default else "0 = torch's default"
        raise UsageError(f"{key}={threads} is outside the allowed range [1, inf) ({default}; this machine has "
                         f"{os.cpu_count()} cores)")


def available_memory(device: str) -> int | None:
    """Bytes free on ``device`` (CUDA: the device's free memory; CPU: MemAvailable), None if unknown."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
