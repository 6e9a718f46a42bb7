"""Prefill latency, ranking overhead and keep-ratio-1 exactness of the drop engine.

    python -m redundancy.bench                                    # CPU, micro shape (32 layers, 576 image tokens)
    python -m redundancy.bench model=llava-1.5-7b device=cuda dtype=bfloat16

The model is random-initialised with the chosen shapes (timing needs no trained
weights). Each method's prefill (vision tower + LM prompt pass with a KV cache,
as the first step of ``generate``) is timed as the median of ``repeats`` runs
after ``warmup`` runs; on CUDA with synchronised clocks. The ranking overhead is
measured in separate profiled runs (the engine times its scoring + top-k work)
and reported as a share of that method's median prefill. The FLOPs-predicted
speedup uses full-sequence LM FLOPs plus the vision encoder (what the measured
prefill runs), in the paper's convention (:mod:`redundancy.flops`).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig

from redundancy.cli import run_entry
from redundancy.engine import apply_schedule
from redundancy.flops import flops_report
from redundancy.models.factory import build_model, config_from_dims
from redundancy.presets import ModelDims, get_preset
from redundancy.schedule import DropSchedule

# The CPU stand-in: the micro-LLaVA's depth and image-token count, narrow width.
MICRO = ModelDims(
    name="micro",
    num_layers=32,
    hidden=256,
    ffn=688,
    heads=8,
    kv_heads=8,
    vocab=512,
    n_image=576,
    n_text=48,
    vision_layers=2,
    vision_hidden=64,
    vision_ffn=128,
    vision_heads=2,
    vision_tokens=577,
    vision_patch=2,
    vision_crops=1,
    projector_in=64,
    projector_hidden=256,
)


@dataclass
class BenchConfig:
    model: str = "micro"  # micro | a preset of redundancy.presets (random-init with its shapes)
    methods: list[str] = field(default_factory=lambda: ["vanilla", "fastv", "pdrop", "drop"])
    layer: int = 16  # the `drop` point
    ratio: float = 0.1
    ranker: str | None = None  # override every method's ranker (None = each method's official default)
    rank_layer: str | None = None  # override every method's ranking layer: stage_last | next
    batch_size: int = 1
    repeats: int = 10
    warmup: int = 2
    dtype: str = "float32"
    attn: str = "sdpa"
    device: str = "auto"
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def schedule_for(method: str, layer: int, ratio: float, **opts: str | None) -> DropSchedule:
    """The named method at its published defaults; ``opts`` (ranker, rank_layer) override them."""
    opts = {k: v for k, v in opts.items() if v is not None}
    builders: dict[str, Callable[[], DropSchedule]] = {
        "vanilla": DropSchedule.vanilla,
        "fastv": lambda: DropSchedule.fastv(**opts),
        "pdrop": lambda: DropSchedule.pdrop(**opts),
        "drop": lambda: DropSchedule.drop(layer=layer, ratio=ratio, **opts),
    }
    if method not in builders:
        raise ValueError(f"method={method!r} is unknown; choose from {sorted(builders)}")
    return builders[method]()


def random_inputs(model: Any, dims: ModelDims, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """A prompt of ``dims.n_text`` text tokens around one image per sample."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    n_img = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    pre = dims.n_text // 2
    text = torch.randint(1, cfg.text_config.vocab_size - 1, (batch_size, dims.n_text), generator=gen)
    image = torch.full((batch_size, n_img), cfg.image_token_id)
    ids = torch.cat([text[:, :pre], image, text[:, pre:]], dim=1)
    size = cfg.vision_config.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=gen)
    device, dtype = model.device, next(model.parameters()).dtype
    return {"input_ids": ids.to(device), "pixel_values": pixels.to(device, dtype)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """One prompt pass as ``generate`` does it: KV cache on, last-token logits."""
    return model(**inputs, use_cache=True, logits_to_keep=1).logits


def time_prefill(model: Any, inputs: dict[str, torch.Tensor], repeats: int, warmup: int) -> list[float]:
    """Wall seconds of ``repeats`` prefills after ``warmup`` (synchronised clocks)."""
    out = []
    for i in range(warmup + repeats):
        _sync(model.device)
        start = time.perf_counter()
        prefill(model, inputs)
        _sync(model.device)
        if i >= warmup:
            out.append(time.perf_counter() - start)
    return out


@torch.no_grad()
def keep_all_max_diff(model: Any, inputs: dict[str, torch.Tensor]) -> float:
    """Max |logit| difference between the unmodified model and the engine at keep ratio 1
    (PyramidDrop with lam = 1 at the quarter layers), over every real position of a
    batch of two whose second row is left-padded by up to 5 tokens (so masks are exercised)."""
    layers = model.config.text_config.num_hidden_layers
    quarters = sorted({max(1, layers * q // 4) for q in (1, 2, 3)})  # 8, 16, 24 for 32 layers
    ids = inputs["input_ids"][:1].repeat(2, 1)
    mask = torch.ones_like(ids)
    first_image = int((ids[0] == model.config.image_token_id).nonzero()[0])
    pad = max(0, min(5, first_image - 1))  # pad only text before the image
    ids[1, :pad], mask[1, :pad] = 0, 0
    batch = {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"][:1].repeat(2, 1, 1, 1)}
    ref = model(**batch).logits.float()
    with apply_schedule(model, DropSchedule.pdrop(layers=quarters, lam=1.0)):
        out = model(**batch).logits.float()
    return float((out - ref)[mask.bool()].abs().max())


def run(cfg: BenchConfig) -> str:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dims = MICRO if cfg.model == "micro" else get_preset(cfg.model)
    family = "llava_next" if "next" in cfg.model else "llava"
    schedules = {m: schedule_for(m, cfg.layer, cfg.ratio, ranker=cfg.ranker, rank_layer=cfg.rank_layer) for m in cfg.methods}
    for s in schedules.values():
        s.validate_for(dims.num_layers)
    model = build_model(config_from_dims(dims, "llava"), attn_implementation=cfg.attn,
                        dtype=getattr(torch, cfg.dtype), seed=cfg.seed).to(device)
    if family != "llava":
        print("note: timing uses the LLaVA-1.5 packing with the preset's image-token count", file=sys.stderr)
    inputs = random_inputs(model, dims, cfg.batch_size, cfg.seed)
    n_image = int((inputs["input_ids"][0] == model.config.image_token_id).sum())
    dims_run = ModelDims.from_hf_config(model.config, n_image=n_image, n_text=dims.n_text, name=dims.name)

    lines = [
        f"model {dims.name}: {dims.num_layers} layers, d={dims.hidden}, {n_image} image + {dims.n_text} text tokens, "
        f"batch {cfg.batch_size}, {cfg.dtype}, {cfg.attn}, {device}, threads={torch.get_num_threads()}",
        f"max |logit diff| at keep ratio 1 vs unmodified model (left-padded batch of 2): {keep_all_max_diff(model, inputs):.3e}",
        f"{'method':<44} {'prefill ms':>11} {'speedup':>8} {'FLOPs-pred.':>11} {'ranking ms':>11} {'ranking %':>10}",
    ]
    base_ms = None
    for name, schedule in schedules.items():
        if name == "vanilla" or schedule.is_vanilla:
            times = time_prefill(model, inputs, cfg.repeats, cfg.warmup)
            rank_ms = 0.0
        else:
            with apply_schedule(model, schedule, trace=False):
                times = time_prefill(model, inputs, cfg.repeats, cfg.warmup)
            ranking = []
            with apply_schedule(model, schedule, trace=False, profile=True) as trace:
                for _ in range(max(3, cfg.repeats // 2)):
                    prefill(model, inputs)
                    ranking.append(trace.ranking_seconds)
            rank_ms = statistics.median(ranking) * 1e3
        ms = statistics.median(times) * 1e3
        report = flops_report(dims_run, schedule)
        predicted = (report.vanilla_full_sequence + report.vision) / (
            report.full_sequence + report.ranking + report.vision
        )
        base_ms = base_ms or (ms if schedule.is_vanilla else None)
        speed = f"{base_ms / ms:8.2f}" if base_ms else f"{'-':>8}"
        pred = f"{predicted:11.2f}"
        label = name if schedule.is_vanilla else f"{name} {schedule.params} {schedule.rank_layer}"
        lines.append(f"{label:<44} {ms:11.2f} {speed} {pred} {rank_ms:11.3f} {100 * rank_ms / ms:9.2f}%")
    lines.append("prefill = vision tower + LM prompt pass with KV cache; median of "
                 f"{cfg.repeats} after {cfg.warmup} warm-up; FLOPs-pred. = vanilla / method (full-sequence LM + ranking + vision FLOPs, eq. 4)")
    return "\n".join(lines)


@hydra.main(version_base=None, config_path="../conf", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_entry(run, cfg)


if __name__ == "__main__":
    main()
