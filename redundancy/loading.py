"""The one place models are loaded, devices and dtypes resolved, and the shipped assets found.

    model, processor = load_model("micro-llava-vanilla")      # shipped with the package
    model, processor = load_model("path/to/llava-1.5-7b-hf")  # any local HF directory
    resolve_dtype("auto", resolve_device("auto"))              # bfloat16 on CUDA, float32 elsewhere

The shipped micro-LLaVA checkpoints (``SHIPPED``) are written by :mod:`redundancy.micro.export`.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import torch

from redundancy.validate import check_weights

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = ASSETS / "checkpoints"
TEST_SET = ASSETS / "microvqa" / "test"
CALIBRATION_SET = ASSETS / "microvqa" / "calibration"
"""64 questions of the benchmark's ``val`` split (never a test image): the ``debias`` prior's default
calibration images (written by ``redundancy.micro.microvqa.write_split(..., "val", 64, ...)``)."""
_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration"}
"""Model classes by ``model_type`` (names: transformers' modelling code loads with the first model, not at import)."""


def resolve(name_or_path: str | Path) -> Path:
    """A shipped checkpoint name or a local model directory."""
    shipped = SHIPPED / str(name_or_path)
    if shipped.is_dir():
        return shipped
    path = Path(name_or_path)
    if path.is_dir():
        return path
    known = sorted(p.name for p in SHIPPED.iterdir()) if SHIPPED.is_dir() else []
    raise ValueError(f"model {str(name_or_path)!r} is neither a shipped checkpoint {known} nor a local directory")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else the CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# The one dtype table: the names every command accepts (``dtype=``), aliases included.
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
}


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """A dtype by name (:data:`DTYPES`); ``auto``: bfloat16 on CUDA, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype={name!r} is unknown; choose one of {['auto', *DTYPES]}")
    return DTYPES[name]


def load_model(
    name_or_path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[Any, Any]:
    """``(model, processor)`` from a shipped name or a local HF directory (offline). The
    directory's config and weight files are checked first (:func:`redundancy.validate.check_weights`):
    a broken file is a ``ValueError`` naming it, before the model is built."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    path = resolve(name_or_path)
    check_weights(path)
    config = AutoConfig.from_pretrained(path)
    if config.model_type not in _CLASSES:
        raise ValueError(f"{path} holds a {config.model_type!r} model; supported: {sorted(_CLASSES)}")
    model_class = getattr(transformers, _CLASSES[config.model_type])
    model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor


_NOT_CODE = (":(exclude)results", ":(exclude)redundancy/assets/checkpoints")


def git_revision() -> str:
    """The package's git revision, ``+dirty`` when tracked files differ from it (except the
    recorded ``results/`` and the shipped weights, which rows identify by their fingerprint);
    ``unknown`` outside a git checkout (an installed wheel)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, cwd=here
        )
        dirty = (
            subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ".", *_NOT_CODE], cwd=here.parent).returncode != 0
        )
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
