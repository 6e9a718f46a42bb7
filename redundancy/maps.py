"""Record the attention maps and kept image tokens of a few held-out questions (Fig. 1b, Fig. 5).

    python -m redundancy.maps                                   # the shipped vanilla micro-LLaVA
    python -m redundancy.maps -m model=micro-llava-vanilla,micro-llava-pdrop
    python -m redundancy.maps questions=[test-000000,test-000004] query=instruction

Per question, two greedy answers: the unmodified model, recording the ranking query's attention
over the image tokens in every decoder layer, and PyramidDrop (``method.layers``, ``method.lam``),
recording the image tokens kept at each boundary. Written to ``<out>/<model name>.npz``
(:mod:`redundancy.plots.records`, a few hundred KiB), which ``python -m redundancy.figures`` reads
without loading a model. Questions: ``questions`` (ids) or the first ``per_family`` of each family.
"""

from __future__ import annotations

import datetime
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm

import redundancy
from redundancy.cli import launch, run_entry
from redundancy.data import Sample, patch_indices
from redundancy.engine import apply_schedule
from redundancy.evaluate import greedy_answers, prompts
from redundancy.loading import git_revision, load_model, resolve, resolve_device, resolve_dtype
from redundancy.plots.records import MapRecord, Question, evidence_share, save_maps
from redundancy.results import checkpoint_fingerprint
from redundancy.schedule import DropSchedule, MethodSpec
from redundancy.sweep import DataConfig, load_samples
from redundancy.validate import check_device, check_threads, check_writable

QUERIES = ("last", "instruction")


@dataclass
class MapsConfig:
    model: str = "micro-llava-vanilla"  # a shipped checkpoint name or a local HF directory (also the file name)
    data: str | None = None  # null: the shipped microvqa test set; or a local-format directory / TextVQA json
    max_new_tokens: int = 4
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "auto"  # auto = cuda when available, else cpu
    out: str = "results/maps"
    questions: list[str] = field(default_factory=list)  # question ids; empty: the first per_family of each family
    per_family: int = 1
    query: str = "last"  # whose attention is recorded: last (last prompt token) | instruction (their mean)
    # the `method` group (maps.yaml: pdrop): the run whose kept tokens are recorded
    method: Any = field(default_factory=MethodSpec)
    threads: int = 0  # torch CPU threads; 0 = torch's default
    progress: bool = True  # a progress bar over the questions (stderr)


ConfigStore.instance().store(name="maps_schema", node=MapsConfig)


# ------------------------------------------------------------------ choosing questions
def choose(samples: list[Sample], ids: list[str], per_family: int) -> list[Sample]:
    """The samples named by ``ids`` (in that order), or the first ``per_family`` of each family."""
    if ids:
        by_id = {str(s.question_id): s for s in samples}
        unknown = [i for i in ids if i not in by_id]
        if unknown:
            raise ValueError(f"questions={unknown} are not in the data (ids look like {str(samples[0].question_id)!r})")
        return [by_id[i] for i in ids]
    if per_family < 1:
        raise ValueError(f"per_family={per_family} is outside the allowed range [1, inf)")
    out: list[Sample] = []
    counts: dict[str, int] = {}
    for s in samples:
        if counts.get(s.family, 0) < per_family:
            counts[s.family] = counts.get(s.family, 0) + 1
            out.append(s)
    return out


# ------------------------------------------------------------------ per question
def image_grid(model: Any) -> int:
    """Side of the square image-token grid (LLaVA-1.5 style models only)."""
    config = model.config
    if config.model_type != "llava":
        raise ValueError(f"attention maps need a square image-token grid; {config.model_type!r} models have none")
    return config.vision_config.image_size // config.vision_config.patch_size


def seen_image(pixel_values: torch.Tensor, image_processor: Any) -> np.ndarray:
    """``[3, H, W]`` processor output back to the ``[H, W, 3]`` uint8 image the model saw."""
    x = pixel_values.float().cpu()
    if getattr(image_processor, "do_normalize", False):
        mean = torch.tensor(image_processor.image_mean)[:, None, None]
        std = torch.tensor(image_processor.image_std)[:, None, None]
        x = x * std + mean
    return (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def evidence_tokens(sample: Sample, image: Image.Image, model: Any) -> list[int]:
    """Image-token indices of the objects the question is about (generated data only: boxes in
    ``meta``; only when the image is fed at its own size, so boxes map straight onto patches)."""
    vision = model.config.vision_config
    objects, evidence = sample.meta.get("objects"), sample.meta.get("evidence")
    if not objects or evidence is None or image.size != (vision.image_size, vision.image_size):
        return []
    found = {i for e in evidence for i in patch_indices(objects[e]["box"], vision.image_size, vision.patch_size)}
    return sorted(found)


def record_question(
    model: Any, processor: Any, sample: Sample, cfg: MapsConfig, grid: int, schedule: DropSchedule
) -> dict[str, Any]:
    """Both runs of one question: attention per layer (unmodified model) and kept masks (PyramidDrop)."""
    image = Image.open(sample.image_path).convert("RGB")
    inputs = processor(images=[image], text=prompts(processor, [sample]), return_tensors="pt").to(model.device)
    layers = list(range(model.config.text_config.num_hidden_layers))
    n = grid * grid
    with apply_schedule(model, DropSchedule.vanilla(ranker=cfg.query), record_attention=layers) as trace:
        prediction = greedy_answers(model, processor, inputs, cfg.max_new_tokens)[0]
        if trace.n_image[0] != n:
            raise ValueError(f"{trace.n_image[0]} image tokens, expected a {grid}x{grid} grid")
        attention = torch.stack([trace.attention[k][0].float().cpu() for k in layers]).numpy()  # [layers, N]
    with apply_schedule(model, schedule) as trace:
        prediction_drop = greedy_answers(model, processor, inputs, cfg.max_new_tokens)[0]
        kept = np.zeros((len(trace.boundaries), n), bool)  # [boundaries, N]
        for s, boundary in enumerate(trace.boundaries):
            kept[s, boundary.kept[0].cpu().numpy()] = True
    question = Question(
        question_id=str(sample.question_id), question=sample.question, answers=list(sample.answers),
        family=sample.family, prediction=prediction, prediction_drop=prediction_drop,
        evidence=evidence_tokens(sample, image, model),
    )
    return {"question": question, "attention": attention, "kept": kept,
            "image": seen_image(inputs["pixel_values"][0], processor.image_processor)}


# ------------------------------------------------------------------ run
def slug(name: str) -> str:
    """A file name for a model label (labels may be paths)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"


def run(cfg: MapsConfig) -> str:
    if cfg.query not in QUERIES:
        raise ValueError(f"query={cfg.query!r} is unknown; choose one of {list(QUERIES)}")
    schedule = DropSchedule.from_spec(cfg.method)  # checks the schedule before anything loads
    dtype = resolve_dtype(cfg.dtype)  # checked before anything loads
    samples, _ = load_samples(DataConfig(name="maps", path=cfg.data, max_new_tokens=cfg.max_new_tokens))
    chosen = choose(samples, list(cfg.questions), cfg.per_family)
    check_threads(cfg.threads)
    check_device(cfg.device)
    check_writable(cfg.out, "out")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = str(resolve_device(cfg.device))
    model_dir = resolve(cfg.model)
    model, processor = load_model(model_dir, dtype=dtype, device=device, attn_implementation=cfg.attn)
    grid = image_grid(model)
    schedule.validate_for(model.config.text_config.num_hidden_layers)
    recs = [record_question(model, processor, s, cfg, grid, schedule)
            for s in tqdm(chosen, desc="maps", unit="question", disable=not cfg.progress)]
    record = MapRecord(
        model=cfg.model, checkpoint_id=checkpoint_fingerprint(model_dir), grid=grid,
        num_layers=model.config.text_config.num_hidden_layers, query=cfg.query,
        layers=list(range(model.config.text_config.num_hidden_layers)),
        schedule=schedule.record(),
        questions=[r["question"] for r in recs], images=[r["image"] for r in recs],
        attention=np.stack([r["attention"] for r in recs]), kept=np.stack([r["kept"] for r in recs]),
        provenance={"created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "data": cfg.data or "microvqa test", "dtype": cfg.dtype, "attn": cfg.attn, "device": device,
                    "version": redundancy.__version__, "git": git_revision(), "torch": torch.__version__},
    )
    path = save_maps(record, Path(cfg.out) / f"{slug(cfg.model)}.npz")
    return summary(record, path)


def summary(record: MapRecord, path: Path) -> str:
    lines = [(f"{path} ({path.stat().st_size / 1024:.0f} KiB): {len(record.questions)} questions, "
             f"{record.grid}x{record.grid} image tokens, {len(record.layers)} layers, query {record.query!r}")]
    for q, item in enumerate(record.questions):
        shares = [evidence_share(record.attention[q, k], item.evidence) for k in range(len(record.layers))]
        peak = "" if np.isnan(shares).all() else f"; attention on object peaks at layer {int(np.nanargmax(shares))}"
        lines.append(f"  {item.question_id} [{item.family}] {item.question!r} answer {item.answers[0]!r}: "
                     f"vanilla {item.prediction!r}, PyramidDrop {item.prediction_drop!r}{peak}")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="conf/maps", config_name="maps")
def main(cfg: DictConfig) -> None:
    run_entry(run, cfg)


if __name__ == "__main__":
    launch(main, "maps")
