"""Per-position attention priors for the ``debias`` ranker (docs/method.md section 3).

    from redundancy.priors import resolve_prior
    prior = resolve_prior(model, DropSchedule.drop(layer=16, ratio=0.1, ranker="debias"))
    prior.key, prior.values          # "<checkpoint>-L15-N144-C64", [layers, N] float32

The prior of layer ``l`` is the attention each image position receives at ``l`` from the ranking
query (the last prompt token), averaged over calibration images that are not test questions, in
the unmodified model (every image token present). ``debias`` divides the ``last`` score by it.

Where it comes from, in order (:func:`resolve_prior`):

1. a file given (``apply_schedule(..., prior=<file>)``, else the environment variable
   ``REDUNDANCY_PRIOR=<file>``): a safetensors file :func:`save_prior` wrote;
2. the cache, ``<cache>/priors/<key>.safetensors`` with ``<cache>`` = ``$REDUNDANCY_CACHE``,
   else ``$XDG_CACHE_HOME/redundancy``, else ``~/.cache/redundancy``; the key names the
   checkpoint's fingerprint, the layers, the image tokens per image and the calibration count;
3. made on first use and cached: for a checkpoint directory whose processor is saved beside it,
   the first ``REDUNDANCY_PRIOR_IMAGES`` (default :data:`CALIBRATION_IMAGES`) questions of the
   micro benchmark's ``val`` split, generated in memory (:func:`calibration_examples`; never the
   committed test set), with the evaluation prompt.

A model built in memory or without a processor fails with one line naming the file to pass. A
model evaluated on another benchmark should pass a prior made on that benchmark's validation
split (:func:`calibrate` on its inputs, :func:`save_prior`): the micro benchmark's images are
not its distribution.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redundancy.schedule import DropSchedule

CALIBRATION_IMAGES = 64
"""Calibration images of a prior made on first use (``REDUNDANCY_PRIOR_IMAGES`` overrides)."""
PRIOR_FILE_ENV = "REDUNDANCY_PRIOR"
IMAGES_ENV = "REDUNDANCY_PRIOR_IMAGES"
CACHE_ENV = "REDUNDANCY_CACHE"
PRIOR_FLOOR = 1e-12
"""``debias`` divides by ``max(prior, PRIOR_FLOOR)``: a position never attended in calibration
ranks first rather than dividing by zero."""
_BATCH = 16


@dataclass(frozen=True)
class Prior:
    """Mean attention per image position (``values`` ``[len(layers), N]``, float32) at ``layers``."""

    key: str
    layers: tuple[int, ...]
    values: torch.Tensor

    def at(self, layer: int) -> torch.Tensor:
        """``[N]`` the prior of ``layer``."""
        if layer not in self.layers:
            raise ValueError(
                f"ranker='debias': the prior {self.key} holds layers {list(self.layers)}, not layer {layer}; "
                f"pass a prior of this schedule's ranking layers ({PRIOR_FILE_ENV}=<file>)"
            )
        return self.values[self.layers.index(layer)]


def ranking_layers(schedule: DropSchedule) -> tuple[int, ...]:
    """The layer whose query and keys rank at each boundary: ``K-1`` (``stage_last``) or ``K`` (``next``)."""
    shift = 1 if schedule.rank_layer == "stage_last" else 0
    return tuple(k - shift for k in schedule.boundaries)


def prior_key(checkpoint_id: str, layers: Iterable[int], n_image: int, count: int) -> str:
    return f"{checkpoint_id}-L{'_'.join(str(x) for x in layers)}-N{n_image}-C{count}"


DEFAULT_SOURCE = f"calibrated:{CALIBRATION_IMAGES}"


def prior_source() -> str:
    """Where :func:`resolve_prior` will take a prior from, known before anything runs (part of a
    result's identity: a sweep must not reuse a ``debias`` point made with another prior): the
    given file's content hash, else the calibration count."""
    given = os.environ.get(PRIOR_FILE_ENV)
    if given:
        import hashlib

        return "file:" + hashlib.sha256(Path(given).read_bytes()).hexdigest()[:16]
    return f"calibrated:{int(os.environ.get(IMAGES_ENV) or CALIBRATION_IMAGES)}"


def cache_dir() -> Path:
    """Where priors made on first use are kept (outside ``results/``)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "redundancy"
    )
    return Path(root) / "priors"


def save_prior(prior: Prior, path: str | Path) -> Path:
    """Write ``prior`` as safetensors (the key and layers in its metadata); returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({"prior": prior.values.float().contiguous()}, str(tmp),
              metadata={"key": prior.key, "layers": json.dumps(list(prior.layers))})
    tmp.replace(path)
    return path


def load_prior(path: str | Path) -> Prior:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            values = f.get_tensor("prior")
        return Prior(meta["key"], tuple(json.loads(meta["layers"])), values.float())
    except (OSError, KeyError, ValueError, SafetensorError) as err:
        raise ValueError(f"ranker='debias': {path} is not a prior file written by redundancy.priors ({err})") from err


@torch.no_grad()
def calibrate(model: Any, batches: Iterable[dict[str, Any]], layers: Iterable[int]) -> torch.Tensor:
    """``[len(layers), N]`` float32: the attention of the last prompt token over each image position
    at ``layers`` in the unmodified model, averaged over every sample of ``batches`` (model inputs,
    left-padded; every sample with the same ``N`` image tokens)."""
    from redundancy.engine import apply_schedule

    layers = tuple(layers)
    total: torch.Tensor | None = None
    count = 0
    for inputs in batches:
        with apply_schedule(model, DropSchedule.vanilla(), record_attention=layers) as trace:
            model(**inputs)
        for row in range(len(trace.n_image)):
            values = torch.stack([trace.attention[layer][row].float() for layer in layers])
            if total is not None and values.shape != total.shape:
                raise ValueError(f"calibration images give {values.shape[1]} and {total.shape[1]} image tokens")
            total = values if total is None else total + values
            count += 1
    if total is None:
        raise ValueError("calibration needs at least one image")
    return total / count


def resolve_prior(model: Any, schedule: DropSchedule, given: str | Path | Prior | None = None) -> Prior:
    """The prior ``debias`` divides by under ``schedule`` (module docstring: a file given, the
    cache, or the micro benchmark's ``val`` split on first use)."""
    layers = ranking_layers(schedule)
    given = given if given is not None else os.environ.get(PRIOR_FILE_ENV) or None
    if given is not None:
        prior = given if isinstance(given, Prior) else load_prior(given)
        for layer in layers:
            prior.at(layer)
        return prior
    model_dir = Path(str(getattr(model, "name_or_path", "") or "."))
    if not str(getattr(model, "name_or_path", "")) or not (model_dir / "config.json").is_file():
        raise ValueError(_no_calibration("the model was not loaded from a checkpoint directory"))
    count = int(os.environ.get(IMAGES_ENV) or CALIBRATION_IMAGES)
    # A sweep applies the schedule once per batch: the checkpoint's files unchanged, the same prior.
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(model_dir.iterdir()) if f.is_file()]
    memo = (str(model_dir.resolve()), tuple(stamp), layers, count, str(cache_dir()))
    if memo not in _MADE:
        _MADE[memo] = _benchmark_prior(model, model_dir, layers, count)
    return _MADE[memo]


_MADE: dict[tuple[Any, ...], Prior] = {}


def _benchmark_prior(model: Any, model_dir: Path, layers: tuple[int, ...], count: int) -> Prior:
    """The prior of ``model`` (loaded from ``model_dir``) over the benchmark's first ``count`` val
    questions: read from the cache, else calibrated and cached."""
    processor, examples = _processor(model_dir), calibration_examples(count)
    from redundancy.evaluate import batches as chunks
    from redundancy.prompts import prompt
    from redundancy.results import checkpoint_fingerprint

    def encode(chunk: list[Any]) -> dict[str, Any]:
        from PIL import Image

        images = [Image.open(ex.image_path).convert("RGB") for ex in chunk]
        text = [prompt(processor, ex.question) for ex in chunk]
        return processor(images=images, text=text, return_tensors="pt", padding=True).to(model.device)

    n_image = int((encode(examples[:1])["input_ids"] == model.config.image_token_id).sum())
    key = prior_key(checkpoint_fingerprint(model_dir), layers, n_image, count)
    path = cache_dir() / f"{key}.safetensors"
    if path.is_file():
        return load_prior(path)
    values = calibrate(model, (encode(list(c)) for c in chunks(examples, _BATCH)), layers)
    prior = Prior(key, layers, values)
    save_prior(prior, path)
    return prior


def calibration_examples(count: int) -> list[Any]:
    """The first ``count`` questions of the shipped calibration set (the benchmark's ``val`` split,
    :data:`redundancy.loading.CALIBRATION_SET`; never a test question)."""
    from redundancy.data import load_dataset
    from redundancy.loading import CALIBRATION_SET

    examples = load_dataset(CALIBRATION_SET)
    if count > len(examples):
        raise ValueError(f"{IMAGES_ENV}={count}: the calibration set holds {len(examples)} images")
    return examples[:count]


def _processor(model_dir: Path) -> Any:
    if not any((model_dir / name).is_file() for name in ("processor_config.json", "preprocessor_config.json")):
        raise ValueError(_no_calibration(f"{model_dir} holds no processor to encode calibration images"))
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model_dir)


def _no_calibration(why: str) -> str:
    return (
        f"ranker='debias' needs a position prior and none can be made here ({why}): build one on "
        f"calibration images with redundancy.priors.calibrate / save_prior and pass {PRIOR_FILE_ENV}=<file>"
    )
