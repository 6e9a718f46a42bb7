"""Prefill and decode latency, memory, KV cache and ranking overhead of the drop engine.

    python -m redundancy.bench checkpoint=<shipped name or HF dir> threads=1  # trained weights, CPU
    python -m redundancy.bench                                     # random-init micro (32 layers, 576 image tokens)
    python -m redundancy.bench preset=llava-1.5-7b                 # on a GPU: published shape, bfloat16
    python -m redundancy.bench preset=llava-next-7b out=bench.json

``checkpoint=`` names a shipped checkpoint or a local HF directory (loaded by
:func:`redundancy.loading.load_model`; its processor builds the prompts from
images of the shipped microvqa test set). Without it, ``preset=`` builds a
random-initialised model of that shape (timing needs no trained weights).

Every method runs the same greedy generation: one prefill (vision tower + LM
prompt pass with the KV cache, last-token logits, as ``generate`` does) and then
``new_tokens`` cached decode steps. Methods are interleaved round by round
(``warmup`` rounds, then ``repeats`` timed rounds; every other round runs them in the
reverse order) so that drift on a shared machine hits them alike; times are medians over
the rounds, and every ratio (speedups, % of ideal) is the median of the per-round ratios,
each of two runs made back to back in one round, so that a machine whose speed drifts
between rounds cancels out of it (the JSON keeps every round). On CUDA the clock is CUDA events.
Peak memory, the ranking time (scores + top-k, timed by the engine) and the
keep-ratio-1 check come from separate, untimed runs. With ``rank_layer="next"`` the
ranking computes layer K's input norm and key projection of every token, and layer K
takes the kept tokens' rows instead of computing them: the report's ranking time is
what ranking adds (the timed work minus that reused part, timed by computing it once
more); the JSON keeps both (``ranking_gross_ms``, ``reused_ms``). The FLOPs-predicted speedup
comes from :mod:`redundancy.flops` (paper convention, 1 MAC = 1 FLOP).

Beside each method the same rounds time its *ideal* (``ideal=true``): the unmodified HF
layers on the tokens the engine keeps, with no ranking and one gather per boundary
(:mod:`redundancy.staged`), prefill and decode; the engine is reported as a percentage
of it. ``peers=[fastv_eager]`` adds FastV run the way its official code runs it (layer
``K-1`` in eager attention with its attention matrix read). Both need a padding-free
batch (a preset's prompts, or a checkpoint's at batch 1); otherwise the report says so.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig
from PIL import Image
from tqdm.auto import tqdm
from transformers import AutoConfig
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import redundancy
from redundancy.cli import launch, run_entry
from redundancy.data import load_dataset
from redundancy.engine import apply_schedule
from redundancy.evaluate import prompts
from redundancy.flops import flops_report
from redundancy.loading import TEST_SET, git_revision, load_model, resolve, resolve_device, resolve_dtype
from redundancy.models.factory import Family, build_model, config_from_dims
from redundancy.models.llava_next import next_image_layout
from redundancy.presets import DEFAULT_N_TEXT, PRESETS, ModelDims, get_preset
from redundancy.schedule import METHOD_SPECS, DropSchedule, check_ratio
from redundancy.staged import StagePlan, fastv_eager_plan, ideal_plan, staged
from redundancy.stats import median_ratio
from redundancy.validate import available_memory, check_device, check_threads, check_weights, check_writable

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
# The CPU stand-in of LLaVA-1.5's shape: its depth, 576 image tokens, a 1024-wide LM (a quarter of
# Vicuna-7B's width, FFN twice the width) and the micro vision tower; a batch-8 prefill fits in seconds.
LLAVA15_CPU = replace(MICRO, name="llava-1.5-cpu", hidden=1024, ffn=2048, heads=16, kv_heads=16, vocab=32064,
                      n_text=DEFAULT_N_TEXT, projector_hidden=1024)
STAND_INS = {"micro": MICRO, "llava-1.5-cpu": LLAVA15_CPU}
MiB = 2**20
PEERS = {"fastv_eager": "FastV's official way: layer K-1 in eager attention, its attention matrix read"}


@dataclass
class BenchConfig:
    """Schema of ``conf/bench/bench.yaml``; see that file for what each key means. The bench times
    several methods in one run, so each method's parameters have their own key here (``K``, ``lam``,
    ...), not one ``method`` group as the other commands have."""

    layer: int = 16
    ratio: float = 0.1
    K: int = 2
    R: float = 0.5
    layers: list[int] = field(default_factory=lambda: [8, 16, 24])
    lam: float = 0.5
    ranker: str | None = None
    rank_layer: str | None = None
    checkpoint: str | None = None
    preset: str | None = None  # None: micro (when no checkpoint is given)
    methods: list[str] = field(default_factory=lambda: ["vanilla", "fastv", "pdrop", "drop"])
    batch_size: int = 1
    new_tokens: int = 16
    repeats: int = 10
    warmup: int = 2
    dtype: str = "auto"
    attn: str = "sdpa"
    device: str = "auto"
    seed: int = 0
    threads: int | None = None  # None: torch's default
    out: str | None = None
    progress: bool = True  # a progress bar over the timed rounds (stderr)
    ideal: bool = True  # also time each method's ideal (unmodified layers on the engine's kept tokens)
    peers: list[str] = field(default_factory=lambda: ["fastv_eager"])  # peer implementations timed beside


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def schedules_for(cfg: BenchConfig) -> dict[str, DropSchedule]:
    """Each method of ``cfg.methods`` with ``cfg``'s parameters (:meth:`DropSchedule.from_spec`); every
    ratio-like key is checked, used or not, so that a typo'd value never passes silently."""
    for name in ("ratio", "R", "lam"):
        check_ratio(getattr(cfg, name), name)
    unknown = [m for m in cfg.methods if m not in METHOD_SPECS]
    if unknown:
        raise ValueError(f"method={unknown[0]!r} is unknown; choose one of {list(METHOD_SPECS)}")
    given = {
        k: v
        for k, v in asdict(cfg).items()
        if k in ("layer", "ratio", "K", "R", "layers", "lam", "ranker", "rank_layer")
    }
    specs = {
        m: METHOD_SPECS[m](**{k: v for k, v in given.items() if k in _fields(METHOD_SPECS[m])}) for m in cfg.methods
    }
    return {m: DropSchedule.from_spec(spec) for m, spec in specs.items()}


def _fields(spec: type) -> set[str]:
    return {f.name for f in fields(spec)}


def label(schedule: DropSchedule) -> str:
    """``pdrop layers=8,16,24 lam=0.5 next``: method, parameters and ranking layer."""
    if schedule.is_vanilla:
        return "vanilla"
    def text(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
    params = " ".join(f"{k}={text(v)}" for k, v in schedule.params.items())
    return f"{schedule.method} {params} {schedule.rank_layer}"


# ------------------------------------------------------------------ subject
@dataclass
class Subject:
    """The model under test, its prompt batch and the sizes its FLOPs are counted with."""

    model: Any
    inputs: dict[str, torch.Tensor]
    dims: ModelDims  # n_image / n_text of the batch's first row, crops of its image
    weights: str  # "trained" | "random init"


def preset_dims(name: str | None) -> ModelDims:
    if name is None or name == "micro":
        return MICRO
    if name in STAND_INS:
        return STAND_INS[name]
    if name not in PRESETS:
        raise ValueError(f"preset={name!r} is not a known preset; choose one of {[*STAND_INS, *sorted(PRESETS)]}")
    return get_preset(name)


def load_subject(cfg: BenchConfig, device: torch.device, dtype: torch.dtype) -> Subject:
    """A trained model (``cfg.checkpoint``) with processor inputs, or a random-init ``cfg.preset``."""
    if cfg.checkpoint is not None:
        if cfg.checkpoint in STAND_INS or cfg.checkpoint in PRESETS:
            raise ValueError(
                f"checkpoint={cfg.checkpoint!r} is a preset shape: use preset={cfg.checkpoint} (random init)"
            )
        model, processor = load_model(cfg.checkpoint, dtype=dtype, device=device, attn_implementation=cfg.attn)
        inputs, weights, name = processor_inputs(processor, cfg.batch_size), "trained", cfg.checkpoint
    else:
        dims = preset_dims(cfg.preset)
        family: Family = "llava_next" if "next" in (cfg.preset or "") else "llava"
        with torch.device(device):  # initialise on the device: a 7B model in seconds, not minutes
            model = build_model(
                config_from_dims(dims, family), attn_implementation=cfg.attn, dtype=dtype, seed=cfg.seed
            )
        inputs, weights, name = random_inputs(model, dims.n_text, cfg.batch_size, cfg.seed), "random init", dims.name
    inputs = {k: v.to(device, dtype) if v.is_floating_point() else v.to(device) for k, v in inputs.items()}
    ids = inputs["input_ids"]
    n_image = int((ids[0] == model.config.image_token_id).sum())
    pixels = inputs["pixel_values"]
    crops = pixels.shape[1] if pixels.dim() == 5 else 1
    dims = ModelDims.from_hf_config(model.config, n_image=n_image, n_text=ids.shape[1] - n_image, name=name,
                                    vision_crops=crops)
    return Subject(model, inputs, dims, weights)


def random_inputs(model: Any, n_text: int, batch_size: int, seed: int) -> dict[str, torch.Tensor]:
    """``n_text`` random text tokens around one random image per sample, no padding.
    A LLaVA-NeXT image has the largest any-res resolution (base image + every crop)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    size, patch = cfg.vision_config.image_size, cfg.vision_config.patch_size
    out: dict[str, torch.Tensor] = {}
    if cfg.model_type == "llava_next":
        h, w = max(cfg.image_grid_pinpoints, key=lambda hw: hw[0] * hw[1])
        base, high = next_image_layout(h, w, size, patch, cfg.image_grid_pinpoints)
        n_img = base[0] * base[1] + high[0] * high[1]
        crops = image_size_to_num_patches((h, w), cfg.image_grid_pinpoints, size)
        out["pixel_values"] = torch.randn(batch_size, crops, 3, size, size, generator=gen)
        out["image_sizes"] = torch.tensor([[h, w]] * batch_size)
    else:
        n_img = (size // patch) ** 2
        out["pixel_values"] = torch.randn(batch_size, 3, size, size, generator=gen)
    text = torch.randint(1, cfg.text_config.vocab_size, (batch_size, n_text), generator=gen)
    text[text == cfg.image_token_id] = 1
    image = torch.full((batch_size, n_img), cfg.image_token_id)
    out["input_ids"] = torch.cat([text[:, : n_text // 2], image, text[:, n_text // 2 :]], dim=1)
    return out


def processor_inputs(processor: Any, batch_size: int) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` questions of the shipped microvqa test set, left-padded by the processor,
    in the processor's chat template (its family's default when it has none: :mod:`redundancy.prompts`)."""
    samples = load_dataset(TEST_SET)[:batch_size]
    images = [Image.open(s.image_path).convert("RGB") for s in samples]
    batch = processor(images=images, text=prompts(processor, samples), return_tensors="pt", padding=True)
    return dict(batch)


# ------------------------------------------------------------------- timing
class Clock:
    """Marks on the device's timeline: CUDA events on a GPU, ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start: Any, end: Any) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1e3


@dataclass(frozen=True)
class Run:
    """One generation: prefill seconds, decode seconds (all steps), KV-cache bytes after prefill."""

    prefill_s: float
    decode_s: float
    kv_bytes: int


def cache_bytes(cache: Any) -> int:
    """Bytes of every layer's keys and values (the engine's stages cache different lengths)."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model: Any, inputs: dict[str, torch.Tensor]) -> Any:
    """One prompt pass as ``generate`` does it: KV cache on, last-token logits."""
    return model(**inputs, use_cache=True, logits_to_keep=1)


@torch.no_grad()
def generate_greedy(model: Any, inputs: dict[str, torch.Tensor], new_tokens: int, clock: Clock) -> Run:
    """Greedy generation of ``new_tokens`` tokens after the prompt (EOS ignored), cache on."""
    _sync(model.device)
    start = clock.mark()
    out = prefill(model, inputs)
    prefilled = clock.mark()
    cache = out.past_key_values
    kv = cache_bytes(cache)
    token = out.logits[:, -1:].argmax(-1)  # [batch, 1]
    mask = inputs.get("attention_mask")
    for _ in range(new_tokens):
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    end = clock.mark()
    _sync(model.device)
    return Run(clock.seconds(start, prefilled), clock.seconds(prefilled, end), kv)


def installed(model: Any, schedule: DropSchedule, **opts: Any) -> contextlib.AbstractContextManager[Any]:
    """The engine with ``schedule``; the unmodified model for vanilla."""
    return contextlib.nullcontext() if schedule.is_vanilla else apply_schedule(model, schedule, trace=False, **opts)


Variant = Callable[[], contextlib.AbstractContextManager[Any]]
IDEAL = "/ideal"  # suffix of a method's ideal variant


def variants(subject: Subject, schedules: dict[str, DropSchedule], cfg: BenchConfig) -> tuple[dict[str, Variant], str]:
    """What each timed run installs: every method (the engine), each method's ideal (the
    unmodified layers on the engine's kept tokens, :mod:`redundancy.staged`) and each peer;
    and a note when the references cannot run (a padded batch)."""
    model, inputs = subject.model, subject.inputs
    out: dict[str, Variant] = {name: functools.partial(installed, model, s) for name, s in schedules.items()}
    plans: dict[str, StagePlan] = {}
    try:
        if cfg.ideal:
            plans.update(
                {name + IDEAL: ideal_plan(model, inputs, s) for name, s in schedules.items() if not s.is_vanilla}
            )
        plans.update({peer: fastv_eager_plan(model, inputs, cfg.K, cfg.R) for peer in cfg.peers})
    except ValueError as err:  # a left-padded batch (a checkpoint's prompts at batch > 1)
        return out, f"ideal and peers not run: {err}"
    out.update({name: functools.partial(staged, model, plan) for name, plan in plans.items()})
    return out, ""


def time_rounds(subject: Subject, variants: dict[str, Variant], cfg: BenchConfig) -> dict[str, list[Run]]:
    """``warmup`` then ``repeats`` rounds; each round runs every variant once, in order, and the
    next round in the reverse order (no variant always follows the same one)."""
    clock = Clock(subject.model.device)
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    rounds = cfg.warmup + cfg.repeats
    with tqdm(total=rounds * len(variants), desc="bench rounds", unit="run", disable=not cfg.progress) as bar:
        for round_ in range(rounds):
            order = list(variants.items())
            for name, install in order[::-1] if round_ % 2 else order:
                bar.set_postfix_str(f"round {round_ + 1}/{rounds}{' (warm-up)' if round_ < cfg.warmup else ''} {name}")
                with install():
                    run_ = generate_greedy(subject.model, subject.inputs, cfg.new_tokens, clock)
                if round_ >= cfg.warmup:
                    runs[name].append(run_)
                bar.update()
    return runs


@dataclass(frozen=True)
class RankingTime:
    """Medians over profiled prefills: the ranking work as timed (``gross``) and the part of it
    that layer K uses instead of computing it (``reused``: its input norm and key projection of
    the kept tokens, ``rank_layer="next"``); ``added`` is what ranking adds to the prefill."""

    gross: float
    reused: float

    @property
    def added(self) -> float:
        return self.gross - self.reused


def ranking_seconds(subject: Subject, schedule: DropSchedule, runs: int) -> RankingTime:
    """The time the engine spends ranking in one prefill (profiled, synchronised runs)."""
    if schedule.is_vanilla:
        return RankingTime(0.0, 0.0)
    gross, reused = [], []
    with installed(subject.model, schedule, profile=True) as trace:
        for _ in range(runs):
            prefill(subject.model, subject.inputs)
            gross.append(trace.ranking_seconds)
            reused.append(trace.reused_seconds)
    return RankingTime(statistics.median(gross), statistics.median(reused))


def peak_bytes(subject: Subject, install: Variant, new_tokens: int) -> int | None:
    """Peak memory of one generation above what was allocated before it (activations, cache,
    workspaces; not the weights). CUDA: the caching allocator's counters. CPU: the allocations
    recorded by ``torch.profiler`` (None where that record is unavailable)."""
    model, device = subject.model, subject.model.device
    clock = Clock(device)
    with install():
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            generate_greedy(model, subject.inputs, new_tokens, clock)
            return torch.cuda.max_memory_allocated(device) - before
        activities = [torch.profiler.ProfilerActivity.CPU]
        with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
            generate_greedy(model, subject.inputs, new_tokens, clock)
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except AttributeError:  # a torch without the kineto record
        return None
    level = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        level += e.nbytes()  # allocations positive, frees negative
        peak = max(peak, level)
    return peak


@torch.no_grad()
def keep_all_max_diff(model: Any, inputs: dict[str, torch.Tensor]) -> float:
    """Max |logit| difference between the unmodified model and the engine at keep ratio 1
    (PyramidDrop with lam = 1 at the quarter layers), over every real position of a
    batch of two copies of the first sample whose second row is left-padded by up to 5 more
    tokens (so masks are exercised)."""
    layers = model.config.text_config.num_hidden_layers
    quarters = sorted({max(1, layers * q // 4) for q in (1, 2, 3)})  # 8, 16, 24 for 32 layers
    batch = {k: v[:1].repeat(2, *[1] * (v.dim() - 1)) for k, v in inputs.items()}
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids)).clone()
    first_image = int((ids[0] == model.config.image_token_id).nonzero()[0])
    pad = max(0, min(5, first_image - 1))  # pad only text before the image
    ids[1, :pad], mask[1, :pad] = 0, 0
    batch["attention_mask"] = mask
    ref = model(**batch).logits.float()
    with apply_schedule(model, DropSchedule.pdrop(layers=quarters, lam=1.0)):
        out = model(**batch).logits.float()
    return float((out - ref)[mask.bool()].abs().max())


# ------------------------------------------------------------------ results
@dataclass(frozen=True)
class Setup:
    """What was measured, on what: the header of the report and of every written row."""

    model: str
    weights: str
    layers: int
    hidden: int
    n_image: int
    n_text: int
    prompt_length: int
    batch_size: int
    dtype: str
    attn: str
    device: str
    threads: int
    repeats: int
    warmup: int
    new_tokens: int
    keep1_max_logit_diff: float
    peers: tuple[str, ...] = ()
    note: str = ""  # why the ideal / peer columns are missing, if they are
    torch_version: str = torch.__version__
    version: str = redundancy.__version__
    git: str = field(default_factory=git_revision)  # the code that measured (``+dirty``: with local changes)
    order: str = "alternating"  # every other round runs the variants in reverse order


@dataclass(frozen=True)
class MethodResult:
    """One method's figures. Times are medians over the rounds; ratios are medians of the per-round
    ratios (:func:`redundancy.stats.median_ratio`); speedups are relative to ``vanilla`` (None when
    vanilla was not run); bytes are per batch."""

    method: str
    label: str
    stage_counts: list[int]  # image tokens per stage (first row)
    prefill_ms: float
    decode_ms_per_token: float | None
    kv_cache_bytes: int
    peak_bytes: int | None
    prefill_samples_per_s: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float | None
    predicted_speedup: float  # prefill FLOPs (LM full sequence + ranking + vision) vanilla / method
    predicted_speedup_lm: float  # LM full-sequence FLOPs vanilla / method (flops.py's full_sequence_ratio)
    ranking_ms: float | None  # what ranking adds (gross - reused); None: a peer (its ranking is inside a layer)
    ranking_share: float | None  # ranking_ms / prefill_ms
    ranking_gross_ms: float | None  # the ranking work as timed, the rows layer K reuses included
    reused_ms: float | None  # layer K's input norm and key projection of the kept tokens, done by the ranking
    schedule: dict[str, Any]
    ideal_prefill_ms: float | None = None  # the unmodified layers on the same kept tokens (None: not run)
    ideal_decode_ms_per_token: float | None = None
    rounds: dict[str, list[float]] = field(default_factory=dict)
    """Per timed round, in order: ``prefill_ms`` and ``decode_ms_per_token`` (and the ideal's,
    ``ideal_prefill_ms``, ``ideal_decode_ms_per_token``), from which the ratios below are paired."""
    speedup: float | None = None
    percent_of_predicted: float | None = None  # 100 * speedup / predicted_speedup
    decode_speedup: float | None = None
    ideal_speedup: float | None = None  # vanilla / ideal prefill
    percent_of_ideal: float | None = None  # 100 * ideal / engine prefill time (= speedup / ideal speedup)
    ideal_decode_speedup: float | None = None
    decode_percent_of_ideal: float | None = None


def _rounds(runs: list[Run], new_tokens: int, prefix: str = "") -> dict[str, list[float]]:
    """Milliseconds per round: the prefill and (with decoding) the decode time per token."""
    out = {prefix + "prefill_ms": [1e3 * r.prefill_s for r in runs]}
    if new_tokens:
        out[prefix + "decode_ms_per_token"] = [1e3 * r.decode_s / new_tokens for r in runs]
    return out


def summarise(name: str, schedule: DropSchedule, runs: list[Run], new_tokens: int, ranking: RankingTime | None,
              peak: int | None, subject: Subject, ideal: list[Run] | None = None, title: str | None = None
              ) -> MethodResult:
    """The figures of one method from its timed runs (``ideal``: its ideal's); FLOPs from
    :func:`redundancy.flops.flops_report`; ``ranking`` None for a peer."""
    batch, length = subject.inputs["input_ids"].shape
    report = flops_report(subject.dims, schedule)
    rounds = {**_rounds(runs, new_tokens), **(_rounds(ideal, new_tokens, "ideal_") if ideal else {})}
    ms = {key: statistics.median(values) for key, values in rounds.items()}  # medians, milliseconds
    prefill_s, token_ms = ms["prefill_ms"] / 1e3, ms.get("decode_ms_per_token")
    return MethodResult(
        method=name,
        label=title or label(schedule),
        stage_counts=list(report.stage_counts),
        prefill_ms=ms["prefill_ms"],
        decode_ms_per_token=token_ms,
        kv_cache_bytes=runs[-1].kv_bytes,
        peak_bytes=peak,
        prefill_samples_per_s=batch / prefill_s,
        prefill_tokens_per_s=batch * length / prefill_s,
        decode_tokens_per_s=None if token_ms is None else 1e3 * batch / token_ms,
        predicted_speedup=(report.vanilla_full_sequence + report.vision)
        / (report.full_sequence + report.ranking + report.vision),
        predicted_speedup_lm=1.0 / report.full_sequence_ratio,
        ranking_ms=None if ranking is None else 1e3 * ranking.added,
        ranking_share=None if ranking is None else ranking.added / prefill_s,
        ranking_gross_ms=None if ranking is None else 1e3 * ranking.gross,
        reused_ms=None if ranking is None else 1e3 * ranking.reused,
        schedule=schedule.record(),
        ideal_prefill_ms=ms.get("ideal_prefill_ms"),
        ideal_decode_ms_per_token=ms.get("ideal_decode_ms_per_token"),
        rounds=rounds,
    )


def against_vanilla(results: list[MethodResult]) -> list[MethodResult]:
    """The results with their ratios to the vanilla row (and to their ideal) filled in, each the
    median of the per-round ratios (:func:`redundancy.stats.median_ratio`); unchanged without a vanilla row."""
    base = next((r for r in results if r.method == "vanilla"), None)
    if base is None:
        return results

    def percent(value: float | None) -> float | None:
        return None if value is None else 100 * value

    out = []
    for r in results:
        vanilla = r.method == "vanilla"  # its own ideal: the unmodified model
        ideal = "" if vanilla else "ideal_"
        prefill, decode = r.rounds["prefill_ms"], r.rounds.get("decode_ms_per_token")
        ideal_prefill, ideal_decode = r.rounds.get(ideal + "prefill_ms"), r.rounds.get(ideal + "decode_ms_per_token")
        speedup = median_ratio(base.rounds["prefill_ms"], prefill)
        assert speedup is not None
        out.append(replace(
            r, speedup=speedup, percent_of_predicted=100 * speedup / r.predicted_speedup,
            decode_speedup=median_ratio(base.rounds.get("decode_ms_per_token"), decode),
            ideal_speedup=median_ratio(base.rounds["prefill_ms"], ideal_prefill),
            percent_of_ideal=percent(median_ratio(ideal_prefill, prefill)),
            ideal_decode_speedup=median_ratio(base.rounds.get("decode_ms_per_token"), ideal_decode),
            decode_percent_of_ideal=percent(median_ratio(ideal_decode, decode)),
        ))
    return out


# header, width (the method column's is computed), formatter
_COLUMNS: tuple[tuple[str, int, Callable[[MethodResult], str]], ...] = (
    ("method", 0, lambda r: r.label),
    ("prefill ms", 11, lambda r: f"{r.prefill_ms:.2f}"),
    ("speedup", 8, lambda r: _opt(r.speedup, ".2f")),
    ("FLOPs-pred.", 11, lambda r: f"{r.predicted_speedup:.2f}"),
    ("% of pred.", 10, lambda r: _opt(r.percent_of_predicted, ".1f", "%")),
    ("ideal", 6, lambda r: _opt(r.ideal_speedup, ".2f")),
    ("% of ideal", 10, lambda r: _opt(r.percent_of_ideal, ".1f", "%")),
    ("decode ms/tok", 13, lambda r: _opt(r.decode_ms_per_token, ".2f")),
    ("dec. speedup", 12, lambda r: _opt(r.decode_speedup, ".2f")),
    ("dec. ideal", 10, lambda r: _opt(r.ideal_decode_speedup, ".2f")),
    ("dec. % ideal", 12, lambda r: _opt(r.decode_percent_of_ideal, ".1f", "%")),
    ("KV MiB", 8, lambda r: f"{r.kv_cache_bytes / MiB:.2f}"),
    ("peak MiB", 9, lambda r: _opt(None if r.peak_bytes is None else r.peak_bytes / MiB, ".1f")),
    ("samples/s", 10, lambda r: f"{r.prefill_samples_per_s:.2f}"),
    ("ranking ms", 11, lambda r: _opt(r.ranking_ms, ".3f")),
    ("ranking %", 10, lambda r: _opt(None if r.ranking_share is None else 100 * r.ranking_share, ".2f", "%")),
)


def _opt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def format_table(results: list[MethodResult]) -> list[str]:
    """A header and one row per method; the method column fits the longest label (left-aligned)."""
    widths = [w for _, w, _ in _COLUMNS]
    widths[0] = max(len(_COLUMNS[0][0]), *(len(r.label) for r in results))

    def row(cells: list[str]) -> str:
        return " ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths)))
    return [row([h for h, _, _ in _COLUMNS]), *(row([f(r) for _, _, f in _COLUMNS]) for r in results)]


def write_results(path: Path, setup: Setup, results: list[MethodResult]) -> None:
    """``.json``: the setup and one record per method; ``.csv``: one row per method, setup columns first."""
    rows, head = [asdict(r) for r in results], asdict(setup)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".json":
        path.write_text(json.dumps({"setup": head, "methods": rows}, indent=1) + "\n")
    elif path.suffix == ".csv":
        with path.open("w", newline="") as f:
            flat = [{**head, **{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}}
                    for r in rows]
            writer = csv.DictWriter(f, fieldnames=list(flat[0]))
            writer.writeheader()
            writer.writerows(flat)
    else:
        raise ValueError(f"out={str(path)!r} must end in .json or .csv")


# --------------------------------------------------------------------- entry
def check(cfg: BenchConfig) -> None:
    """Refuse bad values before any model is built."""
    if cfg.repeats < 1 or cfg.warmup < 0 or cfg.new_tokens < 0 or cfg.batch_size < 1:
        raise ValueError("repeats and batch_size must be >= 1, warmup and new_tokens >= 0")
    if cfg.checkpoint is not None and cfg.preset is not None:
        raise ValueError(f"checkpoint={cfg.checkpoint} and preset={cfg.preset} both name the model; give one")
    check_threads(cfg.threads, zero_is_default=False)
    for peer in cfg.peers:
        if peer not in PEERS:
            raise ValueError(f"peers: {peer!r} is unknown; choose from {sorted(PEERS)}")
    check_device(cfg.device)
    if cfg.out is not None:
        if Path(cfg.out).suffix not in (".json", ".csv"):
            raise ValueError(f"out={cfg.out!r} must end in .json or .csv")
        check_writable(cfg.out, "out", is_file=True)
    if cfg.checkpoint is None:
        dims = preset_dims(cfg.preset)
    else:
        if cfg.checkpoint in STAND_INS or cfg.checkpoint in PRESETS:
            raise ValueError(
                f"checkpoint={cfg.checkpoint!r} is a preset shape: use preset={cfg.checkpoint} (random init)"
            )
        model_dir = resolve(cfg.checkpoint)
        check_weights(model_dir)
        questions = len(load_dataset(TEST_SET))
        if cfg.batch_size > questions:
            raise ValueError(f"batch_size={cfg.batch_size} is more than the {questions} test questions a checkpoint's "
                             "prompts come from")
        config = AutoConfig.from_pretrained(model_dir)
        vision = config.vision_config
        dims = ModelDims.from_hf_config(config, n_image=(vision.image_size // vision.patch_size) ** 2, n_text=64)
    for schedule in schedules_for(cfg).values():
        schedule.validate_for(dims.num_layers)
    check_batch_memory(cfg, dims)


def check_batch_memory(cfg: BenchConfig, dims: ModelDims) -> None:
    """Refuse a batch whose KV cache and activations alone (a lower bound on what the run
    allocates) exceed the memory free on the device."""
    device = resolve_device(cfg.device)
    element = torch.empty((), dtype=resolve_dtype(cfg.dtype, device)).element_size()
    tokens = cfg.batch_size * (dims.n_image + dims.n_text + cfg.new_tokens)
    head_dim = dims.hidden // dims.heads
    kv = 2 * dims.num_layers * dims.kv_heads * head_dim * tokens * element
    activations = tokens * (2 * dims.ffn + 4 * dims.hidden) * element + cfg.batch_size * dims.vocab * 4
    need, free = kv + activations, available_memory(str(device))
    if free is not None and need > free:
        raise ValueError(f"batch_size={cfg.batch_size} needs at least {need / 2**30:.1f} GiB on {device} (KV cache and "
                         f"activations of {tokens} tokens, {dims.num_layers} layers), {free / 2**30:.1f} GiB are free")


def measure(cfg: BenchConfig) -> tuple[Setup, list[MethodResult]]:
    """Build or load the model, then time, profile and summarise every method."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    schedules = schedules_for(cfg)
    subject = load_subject(cfg, device, dtype)
    for schedule in schedules.values():
        schedule.validate_for(subject.dims.num_layers)

    diff = keep_all_max_diff(subject.model, subject.inputs)
    timed, note = variants(subject, schedules, cfg)
    runs = time_rounds(subject, timed, cfg)
    results = [
        summarise(name, s, runs[name], cfg.new_tokens, ranking_seconds(subject, s, max(3, cfg.repeats // 2)),
                  peak_bytes(subject, timed[name], cfg.new_tokens), subject, runs.get(name + IDEAL))
        for name, s in tqdm(schedules.items(), desc="bench profiling", unit="method", disable=not cfg.progress)
    ]
    fastv = DropSchedule.fastv(K=cfg.K, R=cfg.R)
    results += [
        summarise(peer, fastv, runs[peer], cfg.new_tokens, None, peak_bytes(subject, timed[peer], cfg.new_tokens),
                  subject, title=f"{peer} K={cfg.K} R={cfg.R} (peer)")
        for peer in cfg.peers if peer in runs
    ]
    results = against_vanilla(results)
    dims, (batch, length) = subject.dims, subject.inputs["input_ids"].shape
    setup = Setup(
        model=dims.name, weights=subject.weights, layers=dims.num_layers, hidden=dims.hidden, n_image=dims.n_image,
        n_text=dims.n_text, prompt_length=length, batch_size=batch, dtype=str(dtype).removeprefix("torch."),
        attn=cfg.attn, device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        threads=torch.get_num_threads(), repeats=cfg.repeats, warmup=cfg.warmup, new_tokens=cfg.new_tokens,
        keep1_max_logit_diff=diff, peers=tuple(p for p in cfg.peers if p in runs), note=note,
    )
    return setup, results


def format_report(setup: Setup, results: list[MethodResult]) -> str:
    cuda = setup.device != "cpu"
    clock = " (CUDA events)" if cuda else ""
    memory = ("max allocated during the generation minus before it (CUDA allocator)" if cuda
              else "max of the allocations torch.profiler records during the generation (CPU tensors)")
    return "\n".join([
        f"model {setup.model} ({setup.weights}): {setup.layers} layers, d={setup.hidden}, {setup.n_image} image + "
        + f"{setup.n_text} text tokens, batch {setup.batch_size}, {setup.dtype}, {setup.attn}, {setup.device}, "
        + f"threads={setup.threads}",
        "max |logit diff| at keep ratio 1 vs unmodified model (left-padded batch of 2): "
        + f"{setup.keep1_max_logit_diff:.3e}",
        *format_table(results),
        f"prefill = vision tower + LM prompt pass with KV cache; decode = {setup.new_tokens} greedy cached steps; "
        + f"medians of {setup.repeats} interleaved rounds after {setup.warmup} warm-up{clock}; "
        + "every ratio is the median of the per-round ratios",
        "FLOPs-pred. = vanilla / method prefill FLOPs (full-sequence LM + ranking + vision, eq. 4, redundancy.flops); "
        + "% of pred. = measured / predicted speedup",
        "ideal = vanilla / (unmodified HF layers on the engine's kept tokens: no ranking, one gather per boundary, "
        + "redundancy.staged) time; % of ideal = ideal / engine time; dec. = the same per decoded token",
        "ranking = what ranking adds to the prefill: its timed work (scores, top-k; with rank_layer=next layer K's "
        + "norm and keys of every token) minus the rows layer K reuses (JSON: ranking_gross_ms, reused_ms)",
        *([f"peers: {'; '.join(f'{p} = {PEERS[p]}' for p in setup.peers)}"] if setup.peers else []),
        *([setup.note] if setup.note else []),
        f"KV = keys + values of every layer after prefill; peak = {memory}; samples/s = prefill throughput",
    ])


def run(cfg: BenchConfig) -> str:
    """Measure every method of ``cfg``; the printed report (figures also written to ``cfg.out``)."""
    check(cfg)
    setup, results = measure(cfg)
    if cfg.out is not None:
        write_results(Path(cfg.out), setup, results)
    return format_report(setup, results)


@hydra.main(version_base=None, config_path="conf/bench", config_name="bench")
def main(cfg: DictConfig) -> None:
    run_entry(run, cfg)


if __name__ == "__main__":
    launch(main, "bench")
