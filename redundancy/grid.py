"""Answer the same questions under many drop schedules, computing their common layers once.

    outputs, stats = run_grid(model, processor, samples, [DropSchedule.vanilla(),
                              *(DropSchedule.drop(k, r) for k in (2, 8, 16, 24) for r in (0.1, 0.5))])
    outputs[i][j].prediction      # schedule i, sample j (greedy, as redundancy.evaluate.predict)

**Why it is exact.** A schedule whose first boundary is ``K`` computes layers ``0..K-1``
over every token, exactly as the unmodified model does (``docs/method.md`` section 1).
Per batch of samples the runner makes one vanilla ``generate`` (the *trunk*, which is
also the vanilla reference) while a :class:`SharedPrefix` records, at every first
boundary ``K`` of the grid, what a separate run would hold after layer ``K-1``: the
hidden states, the KV cache of layers ``0..K-1`` and the queries/keys of layer ``K-1``
(all the ``stage_last`` ranking probes read). Each other schedule then runs an ordinary
``generate`` under the engine whose first stage is *replayed* from that record
(:class:`redundancy.engine.FirstStageRunner`): the cache layers are copied into the
schedule's own cache and its ranking probes are fed the recorded queries/keys. Ranking,
dropping, the remaining layers and decoding run as in a separate run, on the same
tensors, so predictions and logits are identical (bitwise, given deterministic kernels;
tested on CPU). A replay happens only when the inputs of the first stage (embeddings,
mask, positions) are bitwise equal to the recorded ones; otherwise the schedule computes
its prefix itself (counted in :attr:`GridStats.prefix_misses`). The image features are
encoded once per batch too (:func:`encode_images_once`); what each schedule still runs on
its own is the embedding merge, its layers from ``K`` on, and decoding.

``share=False`` runs every schedule separately (point by point), for comparison.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from redundancy.data import Sample
from redundancy.engine import DropEngine, apply_schedule
from redundancy.evaluate import batches, prompts
from redundancy.models import adapter_for
from redundancy.schedule import DropSchedule
from redundancy.spatial import BoundaryStates, question_diagnostics
from redundancy.stats import median_ratio


@dataclass
class SampleResult:
    """One schedule's answer to one sample."""

    question_id: int | str
    prediction: str
    kept: list[int]
    """Image tokens present in each stage ``[N, kept_1, ...]`` (from the engine's trace)."""
    n_text: int
    """Prompt tokens that are not image tokens (padding excluded)."""
    logits: torch.Tensor | None = None
    """``[steps, vocab]`` float32 logits of each generated token (only with ``keep_logits``)."""
    spatial: dict[str, Any] | None = None
    """Where its kept image tokens lie (only with ``spatial``; :func:`redundancy.spatial.question_diagnostics`)."""
    prior: str = ""
    """``debias``: the key of the position prior it was ranked with (``Trace.prior``)."""


@dataclass
class GridStats:
    shared: bool
    seconds: list[float]
    """Per schedule, wall seconds of its own generate calls (under sharing, the vanilla
    schedule is the trunk and carries its time)."""
    trunk_seconds: float = 0.0
    """Wall seconds of trunk passes that recorded a prefix without serving a vanilla schedule."""
    prefix_hits: int = 0
    prefix_misses: int = 0


# ------------------------------------------------------------------ sharing
@dataclass
class _Snapshot:
    hidden: torch.Tensor  # [batch, n, d] leaving layer K-1
    query: torch.Tensor | None  # [batch, heads, n, head_dim] layer K-1, after rotary
    key: torch.Tensor | None  # [batch, kv_heads, n, head_dim]
    scaling: float = 0.0


class _Capture:
    """A probe that keeps the queries/keys a layer's attention received."""

    def __init__(self) -> None:
        self.query: torch.Tensor | None = None
        self.key: torch.Tensor | None = None
        self.scaling = 0.0

    def __call__(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        self.query, self.key, self.scaling = query, key, scaling


class _PrefixRecorded(Exception):
    """Ends a trunk pass once the prefix is recorded (no vanilla answer wanted)."""


@dataclass
class SharedPrefix:
    """The engine's first-stage hook (:class:`redundancy.engine.FirstStageRunner`):
    records the unmodified first stage of one batch, then replays it for each schedule."""

    boundaries: tuple[int, ...]
    """First boundaries of the grid's schedules: the layers to snapshot at."""
    recording: bool = True
    stop_after_record: bool = False
    hits: int = 0
    misses: int = 0
    _inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)
    _snaps: dict[int, _Snapshot] = field(default_factory=dict, init=False, repr=False)
    _cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, init=False, repr=False)

    def __call__(
        self, engine: DropEngine, hidden: torch.Tensor, start: int, end: int, valid: torch.Tensor,
        position_ids: torch.Tensor, cache: Any, probes: dict[int, list[Any]], all_valid: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        args = (valid, position_ids, cache)
        if self.recording:
            return self._record(engine, hidden, start, end, *args, probes, all_valid)
        return self._replay(engine, hidden, start, end, *args, probes, all_valid)

    def _record(
        self, engine: DropEngine, hidden: torch.Tensor, start: int, end: int, valid: torch.Tensor,
        position_ids: torch.Tensor, cache: Any, probes: dict[int, list[Any]], all_valid: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        if cache is None:
            raise ValueError("recording a shared prefix needs the KV cache (use_cache=True)")
        cuts = [k for k in self.boundaries if start < k < end]
        probes = {li: list(ps) for li, ps in probes.items()}
        captures = {k: _Capture() for k in cuts}
        for k, cap in captures.items():
            probes.setdefault(k - 1, []).append(cap)
        self._snaps, self._inputs = {}, (hidden, valid, position_ids)
        out, lo = hidden, start
        for cut in [*cuts, end]:
            # Layers run in segments with the same mask and positions: the same ops as one call.
            out, pe = engine.run_layers(out, lo, cut, valid, position_ids, cache, probes, all_valid)
            if cut in captures:
                cap = captures[cut]
                self._snaps[cut] = _Snapshot(out, cap.query, cap.key, cap.scaling)
            lo = cut
            if self.stop_after_record and cuts and cut == cuts[-1]:
                break
        # DynamicLayer.update concatenates into new tensors, so these stay the prefill's values.
        deepest = max(cuts, default=0)
        self._cache = [(cache.layers[i].keys, cache.layers[i].values) for i in range(deepest)]
        if self.stop_after_record:
            raise _PrefixRecorded
        return out, pe

    def _replay(
        self, engine: DropEngine, hidden: torch.Tensor, start: int, end: int, valid: torch.Tensor,
        position_ids: torch.Tensor, cache: Any, probes: dict[int, list[Any]], all_valid: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        snap = self._snaps.get(end)
        if snap is None or cache is None or start != 0 or not self._same_inputs(hidden, valid, position_ids) \
                or not set(probes) <= {end - 1}:
            self.misses += 1
            return engine.run_layers(hidden, start, end, valid, position_ids, cache, probes, all_valid)
        for i, (k, v) in enumerate(self._cache[:end]):
            cache.update(k, v, i)
        for probe in probes.get(end - 1, []):
            assert snap.query is not None and snap.key is not None
            probe(snap.query, snap.key, snap.scaling)
        self.hits += 1
        # Zero layers: the stage's position embeddings, computed as the engine computes them.
        return engine.run_layers(snap.hidden, end, end, valid, position_ids, cache, {}, all_valid)

    def _same_inputs(self, hidden: torch.Tensor, valid: torch.Tensor, position_ids: torch.Tensor) -> bool:
        if self._inputs is None:
            return False
        h, v, p = self._inputs
        same = [(hidden, h), (valid, v), (position_ids, p)]
        return all(a.shape == b.shape and torch.equal(a, b) for a, b in same)


@contextlib.contextmanager
def encode_images_once(model: Any) -> Iterator[None]:
    """Within the block, the vision tower and projector run once per pixel tensor: later calls
    of ``get_image_features`` with the same tensor objects return the first call's output (the
    same tensors, so every schedule of a batch reads bitwise the same image features)."""
    multimodal = adapter_for(model).multimodal
    if not hasattr(multimodal, "get_image_features"):
        yield
        return
    original = multimodal.get_image_features
    memo: dict[tuple[Any, ...], Any] = {}

    @functools.wraps(original)  # generate() reads the signature to pick the encoder's inputs
    def cached(*args: Any, **kwargs: Any) -> Any:
        # Keyed by object identity: the inputs of the batch stay alive for the whole block.
        key = tuple(map(id, args)) + tuple((k, id(v)) for k, v in sorted(kwargs.items()))
        if key not in memo:
            memo[key] = original(*args, **kwargs)
        return memo[key]

    multimodal.get_image_features = cached
    try:
        yield
    finally:
        del multimodal.get_image_features


# ------------------------------------------------------------------ running
def encode(processor: Any, samples: Sequence[Sample], device: torch.device) -> Any:
    """The left-padded model inputs of ``samples`` (as :func:`redundancy.evaluate.predict` makes them)."""
    images = [Image.open(s.image_path).convert("RGB") for s in samples]
    return processor(images=images, text=prompts(processor, samples), return_tensors="pt", padding=True).to(device)


def generate_chunk(
    model: Any, processor: Any, inputs: Any, chunk: Sequence[Sample], schedule: DropSchedule,
    max_new_tokens: int, keep_logits: bool, prefix: SharedPrefix | None = None, spatial: bool = False,
) -> list[SampleResult]:
    """The greedy answers to one encoded chunk under ``schedule`` (``prefix``: its first stage shared);
    ``spatial``: also count where the kept image tokens lie (the engine's trace and the states leaving
    each ranking layer, read after the prefill; :mod:`redundancy.spatial`)."""
    with apply_schedule(model, schedule, trace=spatial, first_stage=prefix) as trace, \
            BoundaryStates(model, schedule, enabled=spatial) as states:
        out = model.generate(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False,
            return_dict_in_generate=True, output_logits=keep_logits,
        )
    places: list[Any] = [None] * len(chunk)
    if spatial:
        replayed = {k: snap.hidden for k, snap in prefix._snaps.items()} if prefix is not None else None
        places = question_diagnostics(model, inputs, trace, states.hidden(replayed))
    new = out.sequences[:, inputs["input_ids"].shape[1] :]
    answers = [a.strip() for a in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]
    kept = trace.kept_counts()
    lengths = inputs["attention_mask"].sum(1).tolist()
    logits = torch.stack(out.logits, dim=1).float().cpu() if keep_logits else None  # [batch, steps, vocab]
    return [
        SampleResult(s.question_id, a, k, int(n) - k[0], logits[i] if logits is not None else None, places[i],
                     trace.prior)
        for i, (s, a, k, n) in enumerate(zip(chunk, answers, kept, lengths))
    ]


def run_grid(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    schedules: Sequence[DropSchedule],
    *,
    share: bool = True,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    todo: Sequence[set[int | str]] | None = None,
    on_batch: Callable[[int, list[SampleResult], float, bool], None] | None = None,
    keep_logits: bool = False,
    progress: bool = True,
    spatial: bool = False,
) -> tuple[list[list[SampleResult]], GridStats]:
    """Greedy answers of ``samples`` under each of ``schedules``.

    ``todo[i]``: the question ids schedule ``i`` still needs (default: all); batches are
    fixed slices of ``samples``, and a batch runs for a schedule when any of its questions
    is to do. ``on_batch(i, results, seconds, shared)`` is called after each batch of
    schedule ``i`` (to persist it) with its wall seconds and whether its prefix was replayed.
    ``spatial``: each result also counts where its kept image tokens lie (:mod:`redundancy.spatial`).
    Returns per schedule the results of the batches it ran, in sample order, and the stats.
    """
    model.eval()
    device = next(model.parameters()).device
    todo = [{s.question_id for s in samples} for _ in schedules] if todo is None else list(todo)
    chunks = list(batches(samples, batch_size))
    stats = GridStats(shared=share, seconds=[0.0] * len(schedules))
    results: list[list[SampleResult]] = [[] for _ in schedules]

    def needs(i: int, chunk: Sequence[Sample]) -> bool:
        return any(s.question_id in todo[i] for s in chunk)

    def emit(i: int, res: list[SampleResult], seconds: float, shared: bool = False) -> None:
        stats.seconds[i] += seconds
        results[i].extend(res)
        if on_batch is not None:
            on_batch(i, res, seconds, shared)

    def answer(schedule: DropSchedule, inputs: Any, chunk: Sequence[Sample], prefix: SharedPrefix | None = None
               ) -> tuple[list[SampleResult], float]:
        """Results and wall seconds of one batch under one schedule (a trunk that only records: no results)."""
        _sync(device)
        start = time.perf_counter()
        try:
            res = generate_chunk(model, processor, inputs, chunk, schedule, max_new_tokens, keep_logits, prefix,
                                 spatial)
        except _PrefixRecorded:
            res = []
        _sync(device)
        return res, time.perf_counter() - start

    with torch.no_grad():
        if not share:
            for i in tqdm(range(len(schedules)), desc="points", disable=not progress):
                for chunk in tqdm(chunks, desc="samples", disable=not progress, leave=False):
                    if needs(i, chunk):
                        emit(i, *answer(schedules[i], encode(processor, chunk, device), chunk))
            return results, stats

        bar = tqdm(total=len(samples), desc="samples", unit="q", disable=not progress)
        for chunk in chunks:
            need = [i for i in range(len(schedules)) if needs(i, chunk)]
            inputs = encode(processor, chunk, device) if need else None
            vanilla = [i for i in need if schedules[i].is_vanilla]
            branches = [i for i in need if not schedules[i].is_vanilla]
            if len(branches) + bool(vanilla) < 2:  # nothing to share
                for i in need:
                    emit(i, *answer(schedules[i], inputs, chunk))
                bar.update(len(chunk))
                continue
            prefix = SharedPrefix(tuple(sorted({schedules[i].boundaries[0] for i in branches})))
            prefix.stop_after_record = not vanilla
            trunk = DropSchedule.vanilla() if not vanilla else schedules[vanilla[0]]
            with encode_images_once(model):
                res, seconds = answer(trunk, inputs, chunk, prefix)
                if not vanilla:
                    stats.trunk_seconds += seconds
                for i in vanilla:  # every vanilla schedule is the same computation: the trunk's
                    emit(i, res, seconds if i == vanilla[0] else 0.0, True)
                prefix.recording = False
                for i in tqdm(branches, desc="points", disable=not progress, leave=False):
                    hits = prefix.hits
                    res, seconds = answer(schedules[i], inputs, chunk, prefix)
                    emit(i, res, seconds, prefix.hits > hits)
            stats.prefix_hits += prefix.hits
            stats.prefix_misses += prefix.misses
            bar.update(len(chunk))
        bar.close()
    return results, stats


@dataclass(frozen=True)
class PrefillTiming:
    """A schedule's prefill timed against the unmodified model's in the same rounds."""

    ms: float
    """Median wall milliseconds of the schedule's prefill over the rounds."""
    vanilla_ms: float
    """Median wall milliseconds of the unmodified model's prefill (no engine) over the same rounds."""
    speedup: float
    """Median over the rounds of the unmodified model's time over the schedule's (1 for vanilla)."""
    rounds: int


def time_prefill(
    model: Any, processor: Any, samples: Sequence[Sample], schedule: DropSchedule, *, repeats: int = 3, warmup: int = 1
) -> PrefillTiming:
    """One prefill (vision tower, language model, first logits) of ``samples`` as one batch under
    ``schedule``, unshared, and one of the unmodified model, back to back in each of ``warmup +
    repeats`` rounds (which goes first alternates); synchronised on CUDA. A vanilla schedule is the
    unmodified model itself, timed once per round."""
    device = next(model.parameters()).device
    inputs = encode(processor, samples, device)

    def once(install: Callable[[], contextlib.AbstractContextManager[Any]]) -> float:
        with install():
            _sync(device)
            start = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            _sync(device)
            return 1e3 * (time.perf_counter() - start)

    runs: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {"vanilla": contextlib.nullcontext}
    if not schedule.is_vanilla:
        runs["point"] = functools.partial(apply_schedule, model, schedule, trace=False)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.no_grad():
        for step in range(warmup + repeats):
            order = list(runs.items())
            for name, install in order[::-1] if step % 2 else order:
                ms = once(install)
                if step >= warmup:
                    times[name].append(ms)
    point, vanilla = times.get("point", times["vanilla"]), times["vanilla"]
    speedup = median_ratio(vanilla, point)
    assert speedup is not None  # repeats >= 1
    return PrefillTiming(statistics.median(point), statistics.median(vanilla), speedup, repeats)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
