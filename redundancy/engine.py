"""The drop engine: run an HF LLaVA-family model while image tokens are removed
between decoder layers according to a :class:`~redundancy.schedule.DropSchedule`.

    from redundancy.engine import apply_schedule
    with apply_schedule(model, DropSchedule.pdrop(lam=0.5)) as trace:
        out = model.generate(**inputs, max_new_tokens=8)
    trace.kept_counts()        # per sample: image tokens in each stage

How it works (``docs/method.md`` sections 2-6):

* While the context is active the language model's ``forward`` is replaced by a
  loop over the same HF decoder layers. Between stages the hidden states, position
  ids, validity mask and bookkeeping are gathered to the kept tokens; rows of a
  batch are re-padded on the left, so per-row image spans and counts may differ.
* The ranking score is computed inside the attention call of the ranking layer
  from the query row(s) and the keys the layer already made (a thin wrapper
  registered in transformers' ``AttentionInterface`` that then calls the real
  SDPA / flash / eager kernel). No layer runs twice, no attention matrix is
  materialised, no layer switches to eager.
* Prefill ranks and drops once; each stage's layers cache only the tokens they
  saw, so caches get shorter after each boundary; decoding appends to them with
  positions that follow the stage's policy.
* Cost beyond the layers: the prompt's counts are read on the host once, before the
  first layer; every later size (kept counts, stage widths, padding) follows from them,
  so nothing waits on the device between the first and the last layer, and the trace's
  records stay on the device until read. With ``rank_layer="next"`` layer K reuses the
  ranking's input norm and key projection of the kept tokens (inference only). A
  decoding step computes the rotary embeddings once for all stages and writes the new
  tokens' validity once into a buffer grown in chunks, of which each stage's mask is a view.
* The last hidden states are scattered back to the original sequence length
  (dropped positions hold zeros), so logits, ``logits_to_keep``, the HF loss and
  ``generate`` work unchanged. Image tokens are never supervised, so the loss
  equals the loss on the reduced sequence.
* The rest of the HF contract (``docs/method.md`` section 9): HF's own output capture
  wraps the engine's forward, so ``output_hidden_states`` (put back at the original
  positions) and ``output_attentions`` (over each stage's slots, ``Trace.slots``) work;
  a boundary that drops nothing keeps the layout and the padding; rows without an image
  or without a query pass through; ``inputs_embeds`` use the model's placeholder rule;
  packed rows drop per segment; a cache prefilled without the engine continues as the
  unmodified model.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

from redundancy.models import FamilyAdapter, HFModule, adapter_for
from redundancy.priors import PRIOR_FLOOR, Prior, ranking_layers, resolve_prior
from redundancy.ranking import (
    pack_priorities,
    pool_states,
    pool_windows,
    query_attention,
    random_scores,
    select_top,
    sink_mask,
    sink_scores,
    unrotate,
)
from redundancy.schedule import ATTENTION_RANKERS, DropSchedule, kept_count

if TYPE_CHECKING:  # transformers' modelling code loads when an engine is first attached, not at import
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import BaseModelOutputWithPast

_ATTN_NAME = "redundancy"
_SUPPORTED_IMPLS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
_SINK_RANKERS = ("nosink", "nosink_keep")
# Attention rankers whose score needs more than the probe's softmax (the stage's rotary, the
# hidden states leaving the layer): their probe keeps the query rows and keys for the boundary.
_DEFERRED_RANKERS = ("norope", *_SINK_RANKERS)


def _probing_attention(
    module: HFModule,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hand the layer's own queries/keys to the probes, then run the real kernel."""
    impl = kwargs.pop("redundancy_impl", None)
    probes = kwargs.pop("redundancy_probes", None)
    if impl is None:
        raise RuntimeError("the redundancy attention wrapper ran outside the drop engine")
    if probes:
        scaling = kwargs.get("scaling") or module.scaling
        for probe in probes:
            probe(query, key, scaling)
    if impl == "eager":
        return FamilyAdapter.eager_attention(module)(module, query, key, value, attention_mask, **kwargs)
    kernels = _attention_functions()
    if "flash" not in impl:
        return kernels[impl](module, query, key, value, attention_mask, **kwargs)
    # Flash kernels read the implementation name from the config (it picks their
    # library): they see the real one for the duration of the call.
    config = module.config
    config._attn_implementation_internal = impl
    try:
        return kernels[impl](module, query, key, value, attention_mask, **kwargs)
    finally:
        config._attn_implementation_internal = _ATTN_NAME


@functools.cache
def _attention_functions() -> Any:
    """transformers' attention kernels by name, with the engine's wrapper registered (once)."""
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    AttentionInterface.register(_ATTN_NAME, _probing_attention)
    return ALL_ATTENTION_FUNCTIONS


# --------------------------------------------------------------------- trace
@dataclass
class BoundaryRecord:
    """What happened at one boundary, per sample (indices are original image-token
    indices ``0..N-1`` of that sample, in raster order of its image tokens)."""

    layer: int
    ratio: float
    kept: list[torch.Tensor] = field(default_factory=list)
    """Sorted indices of the image tokens kept from this boundary on."""
    scores: list[torch.Tensor] = field(default_factory=list)
    """``[N]`` float32 ranking score (higher = kept first); NaN for tokens already dropped."""


@dataclass
class Trace:
    """A record of the last prefill (reset at every prefill).

    The per-boundary records and the recorded attention stay on the device during the
    prefill (no host synchronisation between layers) and are copied to the host when
    ``boundaries`` or ``attention`` is first read."""

    schedule: DropSchedule
    n_image: list[int] = field(default_factory=list)
    untouched: list[bool] = field(default_factory=list)
    """Per sample: it kept every image token (no image token, or an attention ranker whose
    query is an image token: nothing to rank with); docs/method.md section 9."""
    slots: list[torch.Tensor] = field(default_factory=list)
    """Per stage ``[batch, n_stage]`` (on the model's device): the original sequence position
    of each slot of the stage's layout (-1: padding added when rows were re-padded); maps the
    stage's attentions and cache entries back to the prompt."""
    segments: list[tuple[int, int, int]] = field(default_factory=list)
    """Packed input: ``(row, start, end)`` of each segment; the trace's samples are these
    segments, in order. Empty otherwise."""
    prefills: int = 0
    prior: str = ""
    """``debias``: the key of the position prior the score is divided by (:mod:`redundancy.priors`)."""
    ranking_seconds: float = 0.0
    """Time spent ranking (scores + top-k) in the last prefill; measured only with ``profile=True``."""
    reused_seconds: float = 0.0
    """``profile=True``, ``rank_layer="next"``: the time layer K spends on its input norm and key
    projection of the kept tokens, which the ranking computed for it (timed by computing them once
    more). ``ranking_seconds - reused_seconds`` is what ranking adds to the prefill."""
    _boundaries: list[BoundaryRecord] = field(default_factory=list, repr=False)
    _attention: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False)
    _deferred: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def boundaries(self) -> list[BoundaryRecord]:
        """One record per boundary of the schedule (host tensors)."""
        self._materialise()
        return self._boundaries

    @property
    def attention(self) -> dict[int, list[torch.Tensor]]:
        """Layer -> per sample ``[N]`` attention of the ranking query over the image
        tokens at that layer (``record_attention``); NaN for tokens already dropped."""
        self._materialise()
        return self._attention

    def defer(self, record: Callable[[], None]) -> None:
        """Run ``record`` (which copies device tensors into the trace) when the trace is read."""
        self._deferred.append(record)

    def _materialise(self) -> None:
        pending, self._deferred = self._deferred, []
        for record in pending:
            record()

    def kept_counts(self) -> list[list[int]]:
        """Per sample, the image tokens present in each stage ``[N, k_1, ...]``."""
        counts = []
        for i, n in enumerate(self.n_image):
            untouched = i < len(self.untouched) and self.untouched[i]
            stages = [n] * (len(self.schedule.boundaries) + 1) if untouched else list(self.schedule.stage_counts(n))
            counts.append(stages)
        return counts

    def reset(self) -> None:
        self.n_image, self._boundaries, self._attention, self._deferred = [], [], {}, []
        self.untouched, self.slots, self.segments = [], [], []
        self.ranking_seconds = self.reused_seconds = 0.0
        self.prefills += 1


class _Stopwatch:
    """Accumulates wall time of the ranking work into the trace (synchronising the
    device around it, so only when profiling)."""

    def __init__(self, trace: Trace, enabled: bool) -> None:
        self.trace, self.enabled = trace, enabled

    @contextlib.contextmanager
    def __call__(self, device: torch.device, into: str = "ranking_seconds") -> Iterator[None]:
        """Time the block into the trace's field ``into``."""
        if not self.enabled:
            yield
            return
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            setattr(self.trace, into, getattr(self.trace, into) + time.perf_counter() - start)


# ----------------------------------------------------------- layout helpers
class _QueryProbe:
    """Attention of the query rows over all keys, computed inside a layer's attention."""

    def __init__(self, rows: _QueryRows, stopwatch: _Stopwatch | None = None, keep_inputs: bool = False) -> None:
        self.rows, self.stopwatch = rows, stopwatch
        self.keep_inputs = keep_inputs
        self.result: torch.Tensor | None = None
        self.inputs: tuple[torch.Tensor, torch.Tensor, float] | None = None
        """``keep_inputs``: the query rows, the keys and the scaling, scored at the boundary."""

    def __call__(self, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        timing = self.stopwatch(query.device) if self.stopwatch else contextlib.nullcontext()
        # No autograd: a checkpointed layer recomputed after the engine is detached runs
        # without the probe and must save the same tensors as the first pass.
        with timing, torch.no_grad():
            # query [batch, heads, n, head_dim] -> the query rows [batch, heads, n_query, head_dim]
            index = self.rows.index
            if index is None:
                rows = query.detach()[:, :, -1:]
            else:
                rows = query.detach().gather(2, index[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[-1]))
            if self.keep_inputs:
                self.inputs = (rows, key.detach(), scaling)
            else:
                self.result = query_attention(rows, key, self.rows.visible, self.rows.weight, scaling)


@dataclass(frozen=True)
class _Stage:
    """Decode-time view of one stage: its layers and which position offset it uses."""

    start: int
    end: int
    group: int  # row of _DecodeState.offsets
    all_valid: bool  # no padding among its prompt slots (known on the host)


class _DecodeMasks:
    """Validity of every stage's cached keys while decoding, in one buffer grown in chunks.

    Row ``s`` holds stage ``s``'s prompt slots right-aligned before column ``width`` (the
    longest stage) and, from ``width`` on, the tokens decoded so far, written once for all
    stages. A step's mask for a stage is a view of it in the kernel's format; nothing is
    concatenated or rebuilt per step.
    """

    chunk = 64

    def __init__(self, valids: Sequence[torch.Tensor], impl: str, dtype: torch.dtype) -> None:
        self.impl, self.dtype = impl, dtype
        self.prefix = [v.shape[1] for v in valids]
        self.width = max(self.prefix)
        self.used = 0
        b, dev = valids[0].shape[0], valids[0].device
        self.valid = torch.ones(len(valids), b, self.width + self.chunk, dtype=torch.bool, device=dev)
        for s, v in enumerate(valids):
            self.valid[s, :, self.width - v.shape[1] : self.width] = v
        self.kernel = self._format(self.valid)
        self.decoded_all_valid = True

    def _format(self, valid: torch.Tensor) -> torch.Tensor:
        """``valid`` as the kernel reads it: SDPA bool, flash int32, eager an additive float mask."""
        if "flash" in self.impl:
            return valid.to(torch.int32)
        if self.impl == "sdpa":
            return valid
        return torch.zeros(valid.shape, dtype=self.dtype, device=valid.device).masked_fill(
            ~valid, torch.finfo(self.dtype).min
        )

    def append(self, new_valid: torch.Tensor | None, q: int) -> None:
        """Record ``q`` decoded tokens (``new_valid`` ``[batch, q]``; ``None``: all real)."""
        capacity = self.valid.shape[-1]
        if self.width + self.used + q > capacity:
            grow = max(self.chunk, capacity - self.width, q)  # doubling the decoded part: amortised O(1)
            pad = torch.ones(*self.valid.shape[:2], grow, dtype=torch.bool, device=self.valid.device)
            shared = self.kernel is self.valid
            self.valid = torch.cat([self.valid, pad], dim=-1)
            self.kernel = self.valid if shared else torch.cat([self.kernel, self._format(pad)], dim=-1)
        lo, hi = self.width + self.used, self.width + self.used + q
        if new_valid is not None:
            self.valid[:, :, lo:hi] = new_valid
            if self.kernel is not self.valid:
                self.kernel[:, :, lo:hi] = self._format(new_valid)
        self.used += q

    def stage_valid(self, s: int) -> torch.Tensor:
        """``[batch, kv]`` validity of stage ``s``'s cached keys (a view)."""
        return self.valid[s, :, self.width - self.prefix[s] : self.width + self.used]

    def single_query_mask(self, s: int, all_valid: bool) -> torch.Tensor | None:
        """The mask of one decoded token over stage ``s``'s keys (every earlier key is
        causally visible): ``None`` without padding, else a view of the kernel buffer."""
        if all_valid:
            return None
        view = self.kernel[s, :, self.width - self.prefix[s] : self.width + self.used]
        return view if "flash" in self.impl else view[:, None, None, :]


@dataclass
class _DecodeState:
    cache: Cache
    stages: list[_Stage]
    offsets: torch.Tensor | None  # [groups, batch] long: stage position ids minus the original ones (None: kept)
    masks: _DecodeMasks
    next_position: int  # HF's default position for the next token (first layer's cache length)


@dataclass(frozen=True)
class _QueryRows:
    """The ranking query rows of one stage's layout ``[batch, n]``."""

    index: torch.Tensor | None  # [batch, nq] their slots; None: one row per sample, the last slot
    weight: torch.Tensor | None  # [batch, nq] summing to 1 per sample; None: one row per sample
    visible: torch.Tensor | None  # [batch, nq, n] the keys each row sees; None: every key


def _query_rows(query: torch.Tensor, valid: torch.Tensor, nq: int, last: bool, all_valid: bool) -> _QueryRows:
    """The query rows marked in ``query`` ``[batch, n]`` (``nq``: the most rows any sample has).
    ``last`` (known on the host): every sample's one query row is the last slot, which then
    sees every valid key; nothing is sorted or built (``all_valid``: no padding, no mask)."""
    if last:
        return _QueryRows(None, None, None if all_valid else valid[:, None, :])
    n = query.shape[1]
    nq = min(nq, n)  # a stage narrower than the first stage's query rows (``mean``: image rows dropped)
    counts = query.sum(1)
    order = torch.sort((~query).to(torch.int8), dim=1, stable=True).indices[:, :nq]
    weight = (torch.arange(nq, device=query.device)[None] < counts[:, None]).float() / counts.clamp(min=1)[:, None]
    visible = (torch.arange(n, device=query.device)[None, None, :] <= order[:, :, None]) & valid[:, None, :]
    return _QueryRows(order, weight, visible)


@dataclass(frozen=True)
class _Host:
    """What the prefill reads of the prompt on the host, once, before the first layer."""

    n_image: list[int]  # image tokens per row
    n_valid: list[int]  # real (not padding) tokens per row
    n_query: list[int]  # ranking query rows per row
    query_on_image: list[int]  # per row, 1 where its query is an image token
    ends_in_text: bool
    """Every row ends in a real text token: never dropped, and each relayout puts the kept tokens
    at the end of the rows, so in every stage the last slot holds it."""
    query_at_end: bool
    """Every row's one query row is that last token (inference's ``last``)."""


@dataclass(frozen=True)
class _Layout:
    """What one boundary does to the batch's layout, known on the host before the first layer."""

    counts: list[int]  # image tokens each row keeps from the boundary on
    drops: bool  # some row drops a token (else the layout, padding included, is kept)
    width: int  # slots of the next stage's layout
    all_valid: bool  # the next stage's layout has no padding


def _plan_layouts(
    ratios: Sequence[float], n_image: list[int], n_valid: list[int], untouched: list[bool], length: int, dropping: bool
) -> list[_Layout]:
    """Per boundary, the kept counts and the next stage's width, from the prompt's counts:
    ``select_top`` keeps exactly ``counts`` per row, so the relayout's sizes need no device read."""
    rows, present = list(n_valid), list(n_image)
    width, all_valid = length, all(v == length for v in n_valid)
    plan = []
    for ratio in ratios:
        counts = [
            p if u or not dropping else min(p, kept_count(n, ratio)) for n, p, u in zip(n_image, present, untouched)
        ]
        drops = counts != present
        if drops:
            rows = [r - p + c for r, p, c in zip(rows, present, counts)]
            width = max(rows)
            all_valid = all(r == width for r in rows)
        plan.append(_Layout(counts, drops, width, all_valid))
        present = counts
    return plan


@dataclass(frozen=True)
class _LayerInputs:
    """What ``rank_layer="next"`` ranking computed with layer K's own modules for the rows of
    ``hidden``: its input norm and its key projection (before any norm or rotary)."""

    hidden: torch.Tensor
    normed: torch.Tensor
    key_proj: torch.Tensor

    def take(self, src: torch.Tensor, hidden: torch.Tensor) -> _LayerInputs:
        """The rows ``src`` ``[batch, m]`` (the kept slots), for the gathered states ``hidden``."""
        return _LayerInputs(hidden, gather_rows(self.normed, src), gather_rows(self.key_proj, src))


@contextlib.contextmanager
def _reusing(layer: HFModule, inputs: _LayerInputs | None) -> Iterator[None]:
    """Layer K run right after ranking with its own modules: its input norm and key
    projection return the rows the ranking already computed instead of computing them
    again (both act row by row, so the numbers are the same)."""
    if inputs is None:
        yield
        return
    with _substitute(layer.input_layernorm, inputs.hidden, inputs.normed), \
            _substitute(layer.self_attn.k_proj, inputs.normed, inputs.key_proj):
        yield


@contextlib.contextmanager
def _substitute(module: nn.Module, given: torch.Tensor, result: torch.Tensor) -> Iterator[None]:
    """Within the block, ``module(given)`` (that very tensor) returns ``result``; any other call computes."""
    own = module.__dict__.get("forward")  # an instance-level forward (e.g. accelerate's hooks) is kept
    compute = module.forward

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x is given and not args and not kwargs:
            return result
        return compute(x, *args, **kwargs)

    module.forward = forward
    try:
        yield
    finally:
        if own is None:
            del module.forward
        else:
            module.forward = own


def _to_ordinals(
    values: torch.Tensor, ordinal: torch.Tensor, present: torch.Tensor, n_image: list[int]
) -> list[torch.Tensor]:
    """Per row, ``values`` ``[batch, n]`` placed at the original image-token index
    (NaN where the token is not present)."""
    b, _ = values.shape
    width = max(n_image) + 1
    out = torch.full((b, width), float("nan"), device=values.device)
    out.scatter_(1, torch.where(present, ordinal, width - 1), values.float())
    out = out.cpu()
    return [out[i, :n].clone() for i, n in enumerate(n_image)]


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` ``[batch, m]`` of ``x`` ``[batch, n, d]``: ``x.gather(1, index[..., None].expand(...))``,
    copied row by row (``index_select`` on the flattened rows, a quarter of the time on a CPU)."""
    b, n, d = x.shape
    if b == 1:
        return x.reshape(n, d).index_select(0, index.reshape(-1)).view(1, index.shape[1], d)
    flat = (index + torch.arange(b, device=index.device)[:, None] * n).reshape(-1)
    return x.reshape(b * n, d).index_select(0, flat).view(b, index.shape[1], d)


def _collected_hidden_states() -> list[Any] | None:
    """The hidden states HF's output capture is collecting in this call (``output_hidden_states``), or None."""
    from transformers.utils.output_capturing import _active_collector

    collected = _active_collector.get()
    return collected.get("hidden_states") if collected else None


def _scatter_slots(
    states: torch.Tensor, index: torch.Tensor, length: int, identity: bool = False, tail: int = 0,
    ends_in_text: bool = False,
) -> torch.Tensor:
    """``states`` ``[batch, m, d]`` placed at the original positions ``index`` ``[batch, m]``
    of a ``[batch, length, d]`` tensor; slots at ``length`` (relayout padding) are dropped,
    positions no slot holds (dropped tokens) are zeros. ``identity``: ``index`` is known to be
    ``0..length-1`` (no relayout), so ``states`` is returned as is. ``tail``: only the last
    ``tail`` positions (0: all), e.g. the last token's for next-token logits. ``ends_in_text``:
    every row's last slot holds position ``length - 1`` (known on the host), so a tail of one is that slot."""
    start = length - tail if 0 < tail < length else 0
    if identity or (tail == 1 and ends_in_text):
        return states[:, start:] if identity else states[:, -1:]
    b, m, _ = states.shape
    slot = torch.full((b, length + 1), m, dtype=torch.long, device=index.device)  # position -> slot (m: none)
    slot.scatter_(1, index, torch.arange(m, device=index.device).expand(b, m))
    slot = slot[:, start:length]
    return gather_rows(states, slot.clamp(max=m - 1)).masked_fill((slot == m)[..., None], 0)


def _segment_ids(positions: torch.Tensor) -> torch.Tensor:
    """Packed-sequence index ``[batch, n]`` of each token: a new segment wherever the sequence
    position does not advance by one (HF's ``find_packed_sequence_indices``)."""
    step = torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1)
    return (step != 1).long().cumsum(-1)


def _unpack(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """One left-padded row per packed segment: the flat source index ``[S, m]`` into
    ``[batch * n]`` of each slot (0 at padding), the validity ``[S, m]`` and each segment's
    ``(row, start, end)``."""
    b, n = segments.shape
    first = torch.ones_like(segments, dtype=torch.bool)
    first[:, 1:] = segments[:, 1:] != segments[:, :-1]
    starts = first.reshape(-1).nonzero().flatten()  # flat index of each segment's first token
    ends = torch.cat([starts[1:], starts.new_tensor([b * n])])
    ends = torch.minimum(ends, (starts // n + 1) * n)  # a segment never spans rows
    lengths = ends - starts
    m = int(lengths.max().item())
    col = torch.arange(m, device=segments.device)[None]
    pad = (m - lengths)[:, None]
    valid = col >= pad
    src = torch.where(valid, starts[:, None] + col - pad, 0)
    bounds = [(int(s) // n, int(s) % n, int(s) % n + int(k)) for s, k in zip(starts.tolist(), lengths.tolist())]
    return src, valid, bounds


def _as_method(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a leading ``self`` argument it ignores (HF's decorators expect a method)."""

    @functools.wraps(fn)
    def method(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return method


# -------------------------------------------------------- shared-prefix hook
class FirstStageRunner(Protocol):
    """Computes the first stage of a prefill (layers ``start..end-1``, every token) in
    place of ``engine.run_layers``, with the same arguments and result. The grid runner
    (:class:`redundancy.grid.SharedPrefix`) records that stage once per batch and replays it
    for every schedule whose first boundary is ``end``."""

    def __call__(
        self, engine: DropEngine, hidden: torch.Tensor, start: int, end: int, valid: torch.Tensor,
        position_ids: torch.Tensor, cache: Cache | None, probes: dict[int, list[Any]], all_valid: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]: ...


class DropEngine:
    """Installs a drop schedule on a model; use :func:`apply_schedule`."""

    def __init__(
        self,
        model: nn.Module,
        schedule: DropSchedule,
        *,
        trace: bool = True,
        record_attention: Sequence[int] = (),
        profile: bool = False,
        first_stage: FirstStageRunner | None = None,
        prior: str | Path | Prior | None = None,
    ) -> None:
        self.model = model
        self.adapter = adapter_for(model)
        self.schedule = schedule
        schedule.validate_for(self.adapter.num_layers)
        for layer in record_attention:
            if not 0 <= layer < self.adapter.num_layers:
                raise ValueError(f"record_attention layer {layer} is outside [0, {self.adapter.num_layers - 1}]")
        self.record_layers = frozenset(int(x) for x in record_attention)
        self.keep_trace = trace
        self.first_stage = first_stage
        self.trace = Trace(schedule)
        self._stopwatch = _Stopwatch(self.trace, profile)
        self._pending: dict[str, Any] = {}
        self._state: _DecodeState | None = None
        self._undo: list[Any] = []
        self._impl = ""
        self._prior_given = prior
        self._prior: Prior | None = None

    # ---------------------------------------------------------- install/remove
    def attach(self) -> None:
        from transformers.utils.output_capturing import capture_outputs

        if self.schedule.ranker == "debias" and not self.schedule.is_vanilla:  # before the model changes:
            self._prior = resolve_prior(self.model, self.schedule, self._prior_given)  # it may calibrate
            self.trace.prior = self._prior.key
        _attention_functions()  # registers the wrapper
        configs = self.adapter.attention_configs()
        impls = {cfg._attn_implementation for cfg in configs}
        if len(impls) != 1:
            raise ValueError(f"decoder layers use mixed attention implementations {sorted(map(str, impls))}")
        impl = impls.pop() or "eager"
        if impl == _ATTN_NAME:
            raise RuntimeError("a drop schedule is already applied to this model")
        if impl not in _SUPPORTED_IMPLS:
            raise ValueError(f"attn_implementation={impl!r} is not supported; use one of {list(_SUPPORTED_IMPLS)}")
        self._impl = impl
        lm = self.adapter.language_model
        try:
            for cfg in configs:
                cfg._attn_implementation_internal = _ATTN_NAME
                self._undo.append(lambda cfg=cfg: setattr(cfg, "_attn_implementation_internal", impl))
            # HF's output capture (output_hidden_states / output_attentions) wraps the engine's forward
            # as it wraps the model's own: its hooks on the decoder layers and attention modules record.
            lm.forward = functools.partial(capture_outputs(_as_method(self._forward)), lm)
            self._undo.append(lambda: delattr(lm, "forward"))
            hooks = [
                self.adapter.multimodal.register_forward_pre_hook(self._capture_inputs, with_kwargs=True),
                self.model.register_forward_pre_hook(self._capture_outer, with_kwargs=True),
            ]
            self._undo.extend(h.remove for h in hooks)
            if self.schedule.ranker == "vision_cls":
                self.adapter.cls_layer()  # raises for a family without a [CLS] token
            self._wrap_image_features()
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        while self._undo:
            self._undo.pop()()
        self._state = None

    def _wrap_image_features(self) -> None:
        """``generate`` encodes the images itself and drops the layout inputs (LLaVA-NeXT's
        ``image_sizes``) from the forward call, so they are also captured where the images
        are encoded; so is the ``vision_cls`` score, from the input of the vision layer it reads
        (:meth:`_encode_scoring`)."""
        multimodal = self.adapter.multimodal
        encode = getattr(multimodal, "get_image_features", None)
        if encode is None:
            return
        previous = multimodal.__dict__.get("get_image_features")
        names = self.adapter.layout_inputs
        params = list(inspect.signature(encode).parameters)

        @functools.wraps(encode)  # generate reads the signature to route the image inputs
        def capture(*args: Any, **kwargs: Any) -> Any:
            for name in names:
                value = kwargs.get(name, args[params.index(name)] if name in params[: len(args)] else None)
                if value is not None:
                    self._pending[name] = value
            if self.schedule.ranker == "vision_cls":
                pixels = kwargs.get("pixel_values", args[0] if args else None)
                return self._encode_scoring(encode, pixels, args, kwargs)
            return encode(*args, **kwargs)

        multimodal.get_image_features = capture
        self._undo.append(
            lambda: setattr(multimodal, "get_image_features", previous) if previous is not None
            else delattr(multimodal, "get_image_features")
        )

    def _encode_scoring(
        self, encode: Callable[..., Any], pixel_values: torch.Tensor | None, args: tuple, kwargs: dict
    ) -> Any:
        """``encode(*args, **kwargs)`` while a hook hands the ``vision_cls`` layer's input to the
        score; features encoded before without it (the grid runner encodes a batch's images once)
        have their layer input recomputed from ``pixel_values``."""
        layer = self.adapter.cls_layer()
        inputs: list[torch.Tensor] = []
        hook = layer.register_forward_pre_hook(
            lambda module, a, kw: inputs.append(a[0] if a else kw["hidden_states"]), with_kwargs=True
        )
        try:
            out = encode(*args, **kwargs)
        finally:
            hook.remove()
        if not inputs:
            assert pixel_values is not None, "vision_cls: features encoded before, without their pixel_values"
            inputs.append(self.adapter.cls_layer_input(pixel_values))
        self._pending.setdefault("vision_cls", []).extend(self.adapter.cls_scores(h) for h in inputs)
        return out

    def _capture_inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._pending["input_ids"] = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        if self._pending["input_ids"] is None and embeds is not None:
            # The model's own placeholder rule (get_placeholder_mask): a slot holding the image token's embedding.
            token = torch.tensor(self.adapter.image_token_id, device=embeds.device)
            self._pending["image_mask"] = (embeds == self.adapter.language_model.embed_tokens(token)).all(-1)
        for name in self.adapter.layout_inputs:
            if kwargs.get(name) is not None or name not in self._pending:
                self._pending[name] = kwargs.get(name)

    def _capture_outer(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """What only the outer model's call carries: the labels (training) and ``logits_to_keep``."""
        self._pending["labels"] = kwargs.get("labels")
        self._pending["logits_to_keep"] = kwargs.get("logits_to_keep")

    # ----------------------------------------------------------------- forward
    def _forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **_: Any,
    ) -> BaseModelOutputWithPast:
        from transformers.cache_utils import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast

        lm = self.adapter.language_model
        pending, self._pending = self._pending, {}
        if input_ids is not None:
            pending.setdefault("input_ids", input_ids)
        if inputs_embeds is None:
            inputs_embeds = lm.embed_tokens(input_ids)
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("the drop engine takes a 2D padding attention_mask [batch, seq]")
        if use_cache is None:
            use_cache = bool(getattr(lm.config, "use_cache", True))
        if use_cache and lm.gradient_checkpointing and lm.training:
            use_cache = False  # as HF: checkpointed layers fill no cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=lm.config)
        if past_key_values is not None and not isinstance(past_key_values, DynamicCache):
            raise ValueError(
                f"only DynamicCache is supported (stage caches differ in length), got {type(past_key_values).__name__}"
            )
        cache = past_key_values if use_cache else None
        if cache is not None and cache.get_seq_length() > 0:
            hidden = self._decode(inputs_embeds, attention_mask, position_ids, cache)
            return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)
        b, length, _width = inputs_embeds.shape  # `_` is the **kwargs catch-all here
        dev = inputs_embeds.device
        pos = self.adapter.positions(position_ids, b, length, 0, dev)  # [components, batch, n]
        # HF reads restarting sequence positions as packed sequences only without a padding
        # mask and without a cache (masking_utils._preprocess_mask_arguments); so does the engine.
        packing = self.adapter.packing_positions(position_ids)
        segments = None
        if packing is not None and attention_mask is None and past_key_values is None:
            segments = _segment_ids(packing.expand(b, length))
        if segments is not None and bool((segments[:, -1] > 0).any()):
            hidden, restore = self._prefill_packed(inputs_embeds, segments, pos, pending)
        else:
            ones = torch.ones(b, length, dtype=torch.bool, device=dev)
            valid = ones if attention_mask is None else attention_mask.bool()
            # Called for next-token logits only (the outer model's int ``logits_to_keep``, as ``generate``
            # calls it) and no hidden states collected: only those last positions go back to full length.
            keep = pending.get("logits_to_keep")
            tail = keep if isinstance(keep, int) and _collected_hidden_states() is None else 0
            hidden, slots = self._prefill(inputs_embeds, valid, pos, cache, pending, tail)
            restore = functools.partial(self._to_full, slots=slots, length=length)
        self._restore_hidden_states(restore)
        return BaseModelOutputWithPast(last_hidden_state=hidden, past_key_values=cache)

    def _to_full(self, states: torch.Tensor, stage: int, slots: list[torch.Tensor], length: int) -> torch.Tensor:
        """States ``[batch, n_stage, d]`` of stage ``stage`` at their original positions
        ``[batch, length, d]`` (dropped and padding slots: zeros)."""
        return _scatter_slots(states, slots[stage], length, identity=slots[stage] is slots[0])

    def _restore_hidden_states(self, restore: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
        """``output_hidden_states``: HF's hooks collected each layer's output in its stage's
        layout; put them back at their original positions (docs/method.md section 9)."""
        states = _collected_hidden_states()
        if not states or len(states) != self.adapter.num_layers + 1:
            return  # not requested (or a stage replayed by the grid runner, whose layers did not run)
        boundaries = self.schedule.boundaries
        for i, h in enumerate(states):
            if h is not None:  # entry 0: the embeddings; entry i: the output of layer i - 1
                states[i] = restore(h, bisect.bisect_right(boundaries, max(i - 1, 0)))

    def _prefill_packed(
        self, hidden: torch.Tensor, segments: torch.Tensor, pos: torch.Tensor, pending: dict[str, Any]
    ) -> tuple[torch.Tensor, Callable[[torch.Tensor, int], torch.Tensor]]:
        """Packed rows (restarting positions): each segment runs as its own left-padded row,
        so it ranks with its own query and drops its own image tokens; the outputs go back
        to the packed layout. No cache is filled (HF packs only without a cache)."""
        b, n, d = hidden.shape
        src, valid, bounds = _unpack(segments)  # [S, m] flat indices into [b * n]
        flat = src.reshape(-1)

        def take(x: torch.Tensor) -> torch.Tensor:  # [b, n, ...] -> [S, m, ...]
            return x.reshape(b * n, *x.shape[2:])[flat].reshape(*src.shape, *x.shape[2:])

        for key in ("input_ids", "labels", "image_mask"):
            if pending.get(key) is not None:
                pending[key] = take(pending[key].to(hidden.device))
        pos_u = torch.stack([take(p) for p in pos])
        out, slots = self._prefill(take(hidden), valid, torch.where(valid[None], pos_u, 0), None, pending)
        self.trace.segments = bounds
        keep = valid.reshape(-1)

        def repack(states: torch.Tensor) -> torch.Tensor:  # [S, m, d] -> [b, n, d]
            packed = states.new_zeros(b * n, states.shape[-1])
            packed[flat[keep]] = states.reshape(-1, states.shape[-1])[keep]
            return packed.reshape(b, n, -1)

        m = src.shape[1]
        return repack(out), lambda states, stage: repack(self._to_full(states, stage, slots, m))

    def run_layers(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        valid: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Cache | None,
        probes: dict[int, list[_QueryProbe]],
        all_valid: bool,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Layers ``start..end-1`` over one stage's layout (``valid`` ``[batch, n]``, ``all_valid``:
        no padding, known on the host; ``position_ids`` ``[components, batch, n]``); returns the
        states and the stage's rotary embeddings."""
        pe = self.adapter.rotary(hidden, position_ids)
        mask = self._mask(valid, hidden.shape[1], hidden.dtype, all_valid)
        layer_pos = self.adapter.layer_position_ids(position_ids)
        return self._layer_loop(hidden, start, end, mask, layer_pos, pe, cache, probes), pe

    def _layer_loop(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        mask: torch.Tensor | None,
        layer_pos: torch.Tensor | None,
        pe: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None,
        probes: dict[int, list[_QueryProbe]],
    ) -> torch.Tensor:
        layers = self.adapter.layers
        for li in range(start, end):
            out = layers[li](
                hidden,
                attention_mask=mask,
                position_ids=layer_pos,
                past_key_values=cache,
                use_cache=cache is not None,
                position_embeddings=pe,
                redundancy_impl=self._impl,
                redundancy_probes=probes.get(li),
            )
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def _mask(self, valid: torch.Tensor, q_len: int, dtype: torch.dtype, all_valid: bool) -> torch.Tensor | None:
        """The attention mask of one stage in the format the kernel expects.

        ``valid`` ``[batch, kv]`` marks real tokens (``all_valid``: all of them); the last
        ``q_len`` keys are the queries. Padding query rows see no key, as in HF's own masks,
        so their outputs equal the unmodified model's.
        """
        kv = valid.shape[1]
        if "flash" in self._impl:
            return None if all_valid else valid.to(torch.int32)
        if self._impl == "sdpa" and all_valid and (q_len == kv or q_len == 1):
            return None  # SDPA's own causal path (or no mask for one query)
        dev = valid.device
        q_pos = torch.arange(kv - q_len, kv, device=dev)[:, None]  # [query, 1]
        k_pos = torch.arange(kv, device=dev)[None, :]  # [1, key]
        allowed = ((k_pos <= q_pos)[None] & valid[:, None, :])[:, None]  # [batch, 1, query, key]
        if self._impl == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)

    # ----------------------------------------------------------------- prefill
    def _image_mask(self, hidden: torch.Tensor, valid: torch.Tensor, pending: dict[str, Any]) -> torch.Tensor | None:
        """``[batch, n]`` bool, the image tokens: from ``input_ids``, else the placeholder
        mask the model itself used on ``inputs_embeds`` (captured before the image features
        were merged in)."""
        input_ids = pending.get("input_ids")
        if input_ids is not None:
            return (input_ids.to(hidden.device) == self.adapter.image_token_id) & valid
        image_mask = pending.get("image_mask")
        return None if image_mask is None else image_mask.to(hidden.device) & valid

    def _prefill(
        self,
        hidden: torch.Tensor,
        valid: torch.Tensor,
        pos: torch.Tensor,
        cache: Cache | None,
        pending: dict[str, Any],
        tail: int = 0,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run every stage on the prompt; returns the final (normed) states at the original
        positions (``tail``: the last ``tail`` of them; 0: all) and, per stage, the original
        position of each slot (``length``: padding).

        What the host needs (image and query counts, each stage's width, whether it has
        padding) is read once, before the first layer; from the first layer to the last
        nothing waits on the device, and the trace's records stay there until read."""
        sched, adapter = self.schedule, self.adapter
        b, length, _ = hidden.shape
        dev = hidden.device
        arange = torch.arange(length, device=dev)
        needs_images = not sched.is_vanilla or bool(self.record_layers)
        window = getattr(adapter.text_config, "sliding_window", None)
        if window is not None and getattr(adapter.text_config, "use_sliding_window", True) and length >= window:
            raise ValueError(f"prompt of {length} tokens exceeds the sliding window ({window}); not supported")
        is_img = self._image_mask(hidden, valid, pending)
        if is_img is None:
            if needs_images:
                raise ValueError(
                    "the drop engine cannot find the image tokens: pass input_ids, or inputs_embeds to the "
                    "multimodal model (whose image placeholders it reads), not to the language model"
                )
            is_img = torch.zeros(b, length, dtype=torch.bool, device=dev)
        query, on_image = self._query_mask(is_img, valid, pending.get("labels"))
        host = self._read_layout(is_img, valid, query, on_image)
        n_image, n_valid, n_query, ends_in_text = host.n_image, host.n_valid, host.n_query, host.ends_in_text
        self.trace.reset()
        self.trace.n_image = n_image
        if sched.ranker == "random":
            # The random control is seeded by each sample's own prompt (its valid token ids), so a
            # sample draws the same subset whatever batch it sits in.
            source = pending.get("input_ids")
            source = source if source is not None else hidden.detach().float()
            ids, ok = source.cpu(), valid.cpu()
            pending["row_keys"] = [ids[i][ok[i]].numpy().tobytes() for i in range(b)]

        # Rows that keep every image token: no image, or an attention ranker whose query is an image token.
        untouched = [n == 0 for n in n_image]
        if sched.ranker in ATTENTION_RANKERS:
            untouched = [u or bool(q) for u, q in zip(untouched, host.query_on_image)]
        self.trace.untouched = untouched
        dropping = needs_images and not all(untouched)
        plan = _plan_layouts(sched.ratios, n_image, n_valid, untouched, length, dropping)
        counts = torch.tensor([p.counts for p in plan], device=dev) if dropping else None  # [boundaries, batch]
        controls = self._control_scores(n_image, pending, dev) if dropping else None
        windows = self._pool_windows(n_image, pending, plan, dev) if dropping and sched.ranker == "pool" else None
        ordinal = is_img.long().cumsum(1) - 1  # original image-token index
        index = arange[None].expand(b, length)  # original sequence index of each slot (relayout padding: length)
        slots = [index]
        present = is_img
        all_valid = all(v == length for v in n_valid)
        starts = (0, *sched.boundaries, adapter.num_layers)
        stages: list[_Stage] = []
        valids: list[torch.Tensor] = []
        offsets: list[torch.Tensor] = []
        # Offsets are read on component 0 (the sequence axis) at the last token.
        last_pos0 = self._last_position(pos, valid, ends_in_text)
        nq = max(n_query)  # query tokens are never dropped: the count holds in every stage
        query_at_end = host.query_at_end
        rank_rows = (
            _query_rows(query, valid, nq, query_at_end, all_valid) if dropping or self.record_layers else None
        )
        reuse: _LayerInputs | None = None
        for s in range(len(starts) - 1):
            start, end = starts[s], starts[s + 1]
            probes: dict[int, list[_QueryProbe]] = {}
            recorders = (
                {li: _QueryProbe(rank_rows) for li in self.record_layers if start <= li < end} if rank_rows else {}
            )
            for li, probe in recorders.items():
                probes.setdefault(li, []).append(probe)
            scorer = None
            ranks_here = dropping and s < len(sched.boundaries) and sched.ranker in ATTENTION_RANKERS
            if ranks_here and sched.rank_layer == "stage_last":
                deferred = sched.ranker in _DEFERRED_RANKERS
                scorer = None if deferred else recorders.get(end - 1)
                if scorer is None:
                    assert rank_rows is not None  # made wherever the schedule drops
                    scorer = _QueryProbe(rank_rows, stopwatch=self._stopwatch, keep_inputs=deferred)
                    probes.setdefault(end - 1, []).append(scorer)
            if s == 0 and self.first_stage is not None:  # shared-prefix hook (redundancy.grid)
                hidden, pe = self.first_stage(self, hidden, start, end, valid, pos, cache, probes, all_valid)
            else:
                with _reusing(adapter.layers[start], reuse):
                    hidden, pe = self.run_layers(hidden, start, end, valid, pos, cache, probes, all_valid)
            reuse = None
            if cache is not None:
                if s == 0 or (sched.positions != "keep" and plan[s - 1].drops):
                    offsets.append(self._last_position(pos, valid, ends_in_text) - last_pos0)
                stages.append(_Stage(start, end, len(offsets) - 1, all_valid))
                valids.append(valid)
            for li, probe in recorders.items():
                self.trace.defer(functools.partial(self._record_attention, li, probe, ordinal, present, n_image))
            if s == len(sched.boundaries):
                break

            # ---- rank and drop at boundary `end`
            keep_img, scores = present, None
            if dropping:
                assert counts is not None
                with self._stopwatch(dev):
                    scores, reuse = self._scores(s, end, hidden, pe, scorer, rank_rows, ordinal, present, controls)
                    keep_img = select_top(scores, present, counts[s])
            if self.keep_trace:
                self.trace.defer(functools.partial(
                    self._record_boundary, end, sched.ratios[s], keep_img, scores, ordinal, present, n_image
                ))
            if not plan[s].drops:
                slots.append(index)  # nothing dropped: the stage keeps the layout, padding included
                continue
            if windows is not None:  # pool: each kept token takes the mean of its window
                hidden = pool_states(hidden, windows[s], ordinal, present)
            keep = valid & (~present | keep_img)
            first_pos = self._first_position(pos, valid, all_valid) if sched.positions != "keep" else None
            src, valid = self._relayout(keep, plan[s].width, plan[s].all_valid)
            all_valid = plan[s].all_valid
            hidden = gather_rows(hidden, src)
            if reuse is not None:
                reuse = reuse.take(src, hidden)
                if self._stopwatch.enabled:  # what layer K would have computed itself
                    with self._stopwatch(dev, "reused_seconds"), torch.no_grad():
                        adapter.layers[end].self_attn.k_proj(adapter.layers[end].input_layernorm(hidden))
            index = torch.where(valid, index.gather(1, src), length)
            slots.append(index)
            present = present.gather(1, src) & valid
            ordinal = ordinal.gather(1, src)
            query = query.gather(1, src) & valid
            pos = self._positions(pos.gather(2, src[None].expand(pos.shape[0], -1, -1)), valid, present, first_pos)
            rank_rows = _query_rows(query, valid, nq, query_at_end, all_valid)

        hidden = adapter.language_model.norm(hidden)
        if cache is not None:
            masks = _DecodeMasks(valids, self._impl, hidden.dtype)
            shifts = torch.stack(offsets) if sched.positions != "keep" else None
            self._state = _DecodeState(cache, stages, shifts, masks, next_position=length)
        if self.keep_trace:
            self.trace.slots = [torch.where(i < length, i, -1) for i in slots]
        return _scatter_slots(hidden, index, length, identity=index is slots[0], tail=tail,
                              ends_in_text=ends_in_text), slots

    def _record_boundary(
        self, layer: int, ratio: float, keep_img: torch.Tensor, scores: torch.Tensor | None,
        ordinal: torch.Tensor, present: torch.Tensor, n_image: list[int],
    ) -> None:
        """Copy one boundary's kept set and scores to the host (when the trace is read)."""
        kept_masks = _to_ordinals(keep_img.float(), ordinal, present, n_image)
        scores = torch.full(present.shape, float("nan"), device=present.device) if scores is None else scores
        record = BoundaryRecord(
            layer=layer, ratio=ratio, kept=[torch.nonzero(m == 1).flatten() for m in kept_masks],
            scores=_to_ordinals(scores, ordinal, present, n_image),
        )
        self.trace._boundaries.append(record)

    def _record_attention(
        self, layer: int, probe: _QueryProbe, ordinal: torch.Tensor, present: torch.Tensor, n_image: list[int]
    ) -> None:
        assert probe.result is not None
        self.trace._attention[layer] = _to_ordinals(probe.result, ordinal, present, n_image)

    @staticmethod
    def _read_layout(is_img: torch.Tensor, valid: torch.Tensor, query: torch.Tensor, on_image: torch.Tensor) -> _Host:
        """The prefill's one read of the prompt's layout on the host (``[batch, n]`` masks)."""
        n_image, n_valid, n_query, query_on_image, ends_in_text, query_last = torch.stack(
            [is_img.sum(1), valid.sum(1), query.sum(1), on_image.long(), valid[:, -1] & ~is_img[:, -1], query[:, -1]]
        ).tolist()
        ends = all(ends_in_text)
        return _Host(n_image, n_valid, n_query, query_on_image, ends, ends and max(n_query) == 1 and all(query_last))

    @staticmethod
    def _last_valid(valid: torch.Tensor) -> torch.Tensor:
        n = valid.shape[1]
        return (valid * torch.arange(1, n + 1, device=valid.device)).argmax(1)

    def _last_position(self, pos: torch.Tensor, valid: torch.Tensor, ends_in_text: bool) -> torch.Tensor:
        """``[batch]`` the sequence position (component 0) of each row's last token
        (``ends_in_text``: the last slot, known on the host)."""
        if ends_in_text:
            return pos[0, :, -1]
        return pos[0].gather(1, self._last_valid(valid)[:, None])[:, 0]

    @staticmethod
    def _first_position(pos: torch.Tensor, valid: torch.Tensor, all_valid: bool) -> torch.Tensor:
        """``[batch, 1]`` the smallest position component of each row's first token
        (``all_valid``: the first slot, known on the host)."""
        if all_valid:
            return pos[:, :, :1].amin(0)
        first = valid.long().argmax(1, keepdim=True)[None].expand(pos.shape[0], -1, -1)
        return pos.gather(2, first).amin(0)

    def _query_mask(
        self, is_img: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ranking query rows in the original layout ``[batch, n]`` bool, and per row
        ``[batch]`` whether its query (before the modes below add rows) is an image token.

        Inference: the last prompt token. Training (labels given): every token
        right before an answer span. ``instruction`` adds the text tokens between
        the last image token and the (last) query; ``mean`` every token, image tokens
        included, from the first image token to the (last) query (answers excluded).
        """
        b, n = valid.shape
        dev = valid.device
        arange = torch.arange(n, device=dev)
        last = self._last_valid(valid)
        query = torch.zeros(b, n, dtype=torch.bool, device=dev)
        answer = torch.zeros(b, n, dtype=torch.bool, device=dev)
        if labels is not None:
            answer = (labels.to(dev) != -100) & valid
            query[:, :-1] = ~answer[:, :-1] & answer[:, 1:] & valid[:, :-1]
        query |= ~query.any(1, keepdim=True) & (arange[None] == last[:, None])
        on_image = (query & is_img).any(1)
        last_q = torch.where(query, arange[None], -1).max(1).values
        if self.schedule.ranker == "instruction":
            last_img = torch.where(is_img, arange[None], -1).max(1).values
            instr = valid & ~is_img & ~answer & (arange[None] > last_img[:, None]) & (arange[None] <= last_q[:, None])
            query |= instr
        elif self.schedule.ranker == "mean":
            first_img = torch.where(is_img, arange[None], n).min(1).values
            query |= valid & ~answer & (arange[None] >= first_img[:, None]) & (arange[None] <= last_q[:, None])
        return query, on_image

    def _scores(
        self,
        stage: int,
        boundary: int,
        hidden: torch.Tensor,
        pe: tuple[torch.Tensor, torch.Tensor],
        scorer: _QueryProbe | None,
        rank_rows: _QueryRows | None,
        ordinal: torch.Tensor,
        present: torch.Tensor,
        controls: torch.Tensor | None,
    ) -> tuple[torch.Tensor, _LayerInputs | None]:
        """Ranking score ``[batch, n]`` of every slot at boundary ``boundary`` (higher = kept
        first) and, for ``rank_layer="next"`` without autograd, layer ``boundary``'s input norm
        and key projection of every slot (reused by that layer for the kept slots)."""
        ranker = self.schedule.ranker
        if ranker in ATTENTION_RANKERS:
            reuse = None
            if scorer is not None and scorer.inputs is None:
                att = scorer.result
            else:
                assert rank_rows is not None
                if scorer is not None:
                    assert scorer.inputs is not None  # the branch above took the probe without inputs
                    q, k, scaling = scorer.inputs
                else:  # rank_layer == "next": layer K's norm and q/k on the states leaving layer K-1
                    proj = self.adapter.ranking_qk(boundary, hidden, pe, rank_rows.index)
                    q, k, scaling = proj.query, proj.key, proj.scaling
                    if not torch.is_grad_enabled():
                        reuse = _LayerInputs(hidden, proj.normed, proj.key_proj)
                att = self._attention_score(q, k, scaling, hidden, pe, rank_rows, present)
            assert att is not None
            if ranker == "debias":  # the prior of each original image position (the controls' table)
                assert controls is not None
                att = att / controls[stage].gather(1, ordinal.clamp(min=0))
            return (-att if ranker == "inverse" else att), reuse
        assert controls is not None
        return controls[stage].gather(1, ordinal.clamp(min=0)), None

    def _attention_score(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        scaling: float,
        hidden: torch.Tensor,
        pe: tuple[torch.Tensor, torch.Tensor],
        rank_rows: _QueryRows,
        present: torch.Tensor,
    ) -> torch.Tensor:
        """``[batch, n]`` attention score of the query rows ``query`` over ``key`` (after rotary)
        under the schedule's ranker: ``norope`` rotates both back first (the stage's ``pe``);
        ``nosink`` / ``nosink_keep`` leave the image tokens present whose states leaving the
        ranking layer (``hidden``) are sinks (:func:`~redundancy.ranking.sink_mask`) out of the
        softmax and drop them first / keep them first (:func:`~redundancy.ranking.sink_scores`)."""
        ranker = self.schedule.ranker
        visible = rank_rows.visible
        if ranker == "norope":
            query = unrotate(query, *self.adapter.gather_position_embeddings(pe, rank_rows.index))
            key = unrotate(key, *pe)
        sinks = sink_mask(hidden, present) if ranker in _SINK_RANKERS else None
        if sinks is not None:
            visible = ~sinks[:, None, :] if visible is None else visible & ~sinks[:, None, :]
        att = query_attention(query, key, visible, rank_rows.weight, scaling)
        return att if sinks is None else sink_scores(att, sinks, keep=ranker == "nosink_keep")

    def _control_scores(self, n_image: list[int], pending: dict[str, Any], device: torch.device) -> torch.Tensor | None:
        """``[boundaries, batch, max N]`` scores of the ``random`` / ``uniform`` / ``pool`` controls
        and of the pre-LLM ``vision_cls`` score per original image token, made on the host before the
        first layer; for ``debias``, the prior of each position at each boundary's ranking layer
        (floored at :data:`~redundancy.priors.PRIOR_FLOOR`); None for the other attention rankers."""
        sched = self.schedule
        if sched.ranker == "debias":
            rows = [self._prior_rows(n_image, layer) for layer in ranking_layers(sched)]
        elif sched.ranker in ATTENTION_RANKERS:
            return None
        elif sched.ranker == "random":
            keys = pending["row_keys"]
            rows = [[random_scores(n, sched.seed, s, keys[i]) for i, n in enumerate(n_image)]
                    for s in range(len(sched.boundaries))]
        elif sched.ranker == "vision_cls":  # the same score at every boundary
            cls = pending.get("vision_cls") or []
            images = [[s] for s in torch.cat(cls).float().cpu()] if cls else []
            if sum(len(s[0]) for s in images) != sum(n_image):
                raise ValueError(
                    f"ranker='vision_cls': the vision tower scored {sum(len(s[0]) for s in images)} patches for "
                    f"{sum(n_image)} image tokens (pass pixel_values with input_ids)"
                )
            rows = [pack_priorities(n_image, images)] * len(sched.boundaries)
        else:  # uniform / pool: the same grid priority at every boundary
            priority = [-p for p in self.adapter.image_priorities(n_image, pending)]
            rows = [priority] * len(sched.boundaries)
        table = torch.zeros(len(rows), len(n_image), max(n_image))
        for s, per_row in enumerate(rows):
            for i, row in enumerate(per_row):
                table[s, i, : len(row)] = row
        return table.to(device)

    def _prior_rows(self, n_image: list[int], layer: int) -> list[torch.Tensor]:
        """Per row, the ``debias`` prior of ``layer`` for each image token (one image's prior per image)."""
        assert self._prior is not None
        prior = self._prior.at(layer).clamp(min=PRIOR_FLOOR)
        per_image = len(prior)
        out = []
        for n in n_image:
            if n % per_image:
                raise ValueError(
                    f"ranker='debias': the prior {self._prior.key} holds {per_image} image positions, a sample has {n} "
                    f"image tokens; pass a prior calibrated on images of this size (REDUNDANCY_PRIOR=<file>)"
                )
            out.append(prior.repeat(n // per_image))
        return out

    def _pool_windows(
        self, n_image: list[int], pending: dict[str, Any], plan: list[_Layout], device: torch.device
    ) -> torch.Tensor:
        """``[boundaries, batch, max N]`` the ``pool`` windows (:func:`~redundancy.ranking.pool_windows`)
        of every original image token on its grid, made on the host before the first layer."""
        cells = self.adapter.image_cells(n_image, pending)
        priority = self.adapter.image_priorities(n_image, pending)
        table = torch.full((len(plan), len(n_image), max(n_image)), -1, dtype=torch.long)
        for i, n in enumerate(n_image):
            table[:, i, :n] = pool_windows(cells[i], priority[i], [p.counts[i] for p in plan])
        return table.to(device)

    @staticmethod
    def _relayout(keep: torch.Tensor, m: int, all_valid: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Source slot of each new slot ``[batch, m]`` (kept tokens in order, rows
        left-padded to ``m``, the most any row keeps) and the new validity mask
        (``all_valid``: every row keeps ``m``, known on the host)."""
        b, n = keep.shape
        if all_valid:  # the kept slots in order, row by row (a fixed size: no device read)
            src = torch.nonzero_static(keep, size=b * m)[:, 1].view(b, m)
            return src, torch.ones(b, m, dtype=torch.bool, device=keep.device)
        count = keep.sum(1)
        slot = (m - count)[:, None] + keep.long().cumsum(1) - 1
        target = torch.where(keep, slot, m)
        src = torch.zeros(b, m + 1, dtype=torch.long, device=keep.device)
        src.scatter_(1, target, torch.arange(n, device=keep.device).expand(b, n))
        valid = torch.arange(m, device=keep.device)[None] >= (m - count)[:, None]
        return torch.where(valid, src[:, :m], 0), valid

    def _positions(
        self, kept_positions: torch.Tensor, valid: torch.Tensor, is_image: torch.Tensor, start: torch.Tensor | None
    ) -> torch.Tensor:
        """Position ids ``[components, batch, m]`` of the kept tokens under the schedule's
        policy; ``compact`` renumbers (the family's rule) from ``start`` ``[batch, 1]``, the
        stage's first position before the drop."""
        if self.schedule.positions == "keep":
            return kept_positions
        assert start is not None  # computed wherever positions are renumbered
        return self.adapter.compact_positions(kept_positions, valid, is_image, start)

    # ------------------------------------------------------------------ decode
    def _decode(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        cache: Cache,
    ) -> torch.Tensor:
        """Tokens after the prompt: each stage's layers attend over the stage's cache. Per step
        the engine writes the new tokens' validity once for all stages and computes the rotary
        embeddings once for all stages (one row per position offset); each stage's mask is a
        view of the validity buffer."""
        b, q, _ = hidden.shape
        dev = hidden.device
        state = self._state
        if state is None or state.cache is not cache:
            state = self._state = self._adopt(cache, attention_mask, b, q, dev, hidden.dtype)
        masks = state.masks
        new_valid = attention_mask[:, -q:].bool() if attention_mask is not None else None
        if new_valid is not None and masks.decoded_all_valid and any(st.all_valid for st in state.stages):
            masks.decoded_all_valid = bool(new_valid.all())  # one sync per step, not per stage
        masks.append(new_valid, q)
        positions = self.adapter.positions(position_ids, b, q, state.next_position, dev)  # [components, batch, q]
        groups = 1 if state.offsets is None else state.offsets.shape[0]
        if state.offsets is not None:
            positions = (positions[:, None] + state.offsets[None, :, :, None]).flatten(1, 2)  # [c, groups * batch, q]
        cos, sin = self.adapter.rotary(hidden, positions)
        pes = list(zip(cos.chunk(groups, dim=-3), sin.chunk(groups, dim=-3)))
        layer_pos = [self.adapter.layer_position_ids(p) for p in positions.chunk(groups, dim=1)]
        for s, stage in enumerate(state.stages):
            all_valid = stage.all_valid and masks.decoded_all_valid
            if q == 1:
                mask = masks.single_query_mask(s, all_valid)
            else:  # several tokens at once (a later turn): causal among themselves
                mask = self._mask(masks.stage_valid(s), q, hidden.dtype, all_valid)
            hidden = self._layer_loop(hidden, stage.start, stage.end, mask, layer_pos[stage.group], pes[stage.group],
                                      cache, {})
        state.next_position += q
        return self.adapter.language_model.norm(hidden)

    def _adopt(
        self, cache: Cache, attention_mask: torch.Tensor | None, b: int, q: int, dev: torch.device, dtype: torch.dtype
    ) -> _DecodeState:
        """A cache this engine did not prefill (e.g. an earlier turn run without the engine):
        its prefix was computed without drops, so it continues as one stage over every layer,
        exactly as the unmodified model (docs/method.md section 9)."""
        layers = self.adapter.num_layers
        lengths = {cache.get_seq_length(i) for i in range(layers)} if len(cache.layers) == layers else set()
        if len(lengths) != 1:
            raise ValueError(
                "continuing from a cache whose layers hold different lengths (a drop engine prefilled it, then was "
                "detached) is not supported: continue inside the same apply_schedule block, or re-run the prompt"
            )
        past = lengths.pop()
        if attention_mask is not None and attention_mask.shape[1] == past + q:
            valid = attention_mask[:, :past].bool()
        else:
            valid = torch.ones(b, past, dtype=torch.bool, device=dev)
        stage = _Stage(0, layers, 0, bool(valid.all()))
        return _DecodeState(cache, [stage], None, _DecodeMasks([valid], self._impl, dtype), next_position=past)


@contextlib.contextmanager
def apply_schedule(
    model: nn.Module,
    schedule: DropSchedule,
    *,
    trace: bool = True,
    record_attention: Sequence[int] = (),
    profile: bool = False,
    first_stage: FirstStageRunner | None = None,
    prior: str | Path | Prior | None = None,
) -> Iterator[Trace]:
    """Run ``model`` under ``schedule`` inside the ``with`` block; yields the :class:`Trace`.

    ``record_attention``: layers at which to record the ranking query's attention
    over the image tokens (computed from the layer's own q/k, any kernel).
    ``profile``: time the ranking work into ``trace.ranking_seconds`` and the part of it layer K
    reuses into ``trace.reused_seconds`` (synchronises; computes the reused part once more).
    ``first_stage``: computes the prefill's first stage instead of the engine (the grid
    runner's shared prefix, :mod:`redundancy.grid`).
    ``prior``: the ``debias`` ranker's position prior (a file or a :class:`~redundancy.priors.Prior`);
    by default :func:`~redundancy.priors.resolve_prior` finds or makes one when the block opens.
    The model is restored in every case when the block exits.
    """
    engine = DropEngine(
        model, schedule, trace=trace, record_attention=record_attention, profile=profile, first_stage=first_stage,
        prior=prior,
    )
    engine.attach()
    try:
        yield engine.trace
    finally:
        engine.detach()
