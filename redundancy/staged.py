"""The unmodified decoder layers run stage by stage on fewer tokens: the bench's references.

    plan = ideal_plan(model, inputs, schedule)     # the engine's own kept sets (one traced prefill)
    with staged(model, plan):                      # the unmodified layers on those tokens
        model(**inputs, use_cache=True, logits_to_keep=1)
    with staged(model, fastv_eager_plan(model, inputs, K=2, R=0.5)):
        ...                                        # FastV as its official code runs

* **ideal**: the tokens each stage keeps are given beforehand, so nothing is ranked and
  nothing is decided on the way: per boundary one gather of the hidden states, then the
  HF decoder layers with their own attention kernel, no mask (causal), the rotary
  embeddings of the stage's positions. Decoding runs every stage over its own shorter
  cache. What dropping these tokens could give at best on this hardware.
* **fastv_eager** (a peer implementation): layer ``K-1`` runs in eager attention, its
  ``[heads, n, n]`` attention matrix is read for the last token's row, the top image
  tokens by head-averaged attention are kept (original positions), as the official
  FastV code does; the other layers run as in the ideal.

Both take a batch without padding whose rows hold the image at the same place (the
bench's random prompts, a checkpoint's prompt at batch 1); the language model returns
the last stage's states (no scatter back), enough for next-token logits.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from redundancy.engine import apply_schedule, gather_rows
from redundancy.models import adapter_for
from redundancy.schedule import DropSchedule


@dataclass
class StagePlan:
    """Which tokens each stage's layers see."""

    bounds: list[tuple[int, int]]
    """Per stage, its layers ``start..end-1``."""
    gathers: list[torch.Tensor | None]
    """Per stage, the slots of the previous stage's layout it keeps ``[batch, n_s]`` (None: all)."""
    positions: list[torch.Tensor]
    """Per stage, the position ids of its tokens ``[batch, n_s]``."""
    shifts: list[int]
    """Per stage, its decoding positions minus the unmodified model's (``compact``: negative)."""
    eager_rank: tuple[torch.Tensor, int] | None = None
    """fastv_eager: the image tokens' places ``[n]`` and how many to keep; the first boundary's
    gather is then chosen at run time from layer ``K-1``'s eager attention."""


def _layout(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[n]`` bool, the image tokens of the batch's shared layout; refuses padding or rows that differ."""
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    if mask is not None and not bool(mask.bool().all()):
        raise ValueError("the staged references need a batch without padding")
    image = ids == model.config.image_token_id
    if not bool((image == image[:1]).all()):
        raise ValueError("the staged references need rows with the image at the same place")
    return image[0]


def ideal_plan(model: Any, inputs: dict[str, torch.Tensor], schedule: DropSchedule) -> StagePlan:
    """The stages of ``schedule`` with the kept tokens the engine chooses for ``inputs``
    (read from one traced prefill)."""
    _layout(model, inputs)
    length = inputs["input_ids"].shape[1]
    layers = adapter_for(model).num_layers
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        model(**inputs, use_cache=True, logits_to_keep=1)
    slots = trace.slots
    starts = (0, *schedule.boundaries, layers)
    gathers: list[torch.Tensor | None] = [None]
    positions = [slots[0]]
    for prev, cur in zip(slots, slots[1:]):
        same = prev.shape == cur.shape and bool((prev == cur).all())
        gathers.append(None if same else torch.searchsorted(prev, cur))
        positions.append(cur if schedule.positions == "keep" else torch.arange(cur.shape[1]).expand_as(cur))
    shifts = [0 if schedule.positions == "keep" else s.shape[1] - length for s in slots]
    return StagePlan(list(zip(starts, starts[1:])), gathers, positions, shifts)


def fastv_eager_plan(model: Any, inputs: dict[str, torch.Tensor], K: int, R: float) -> StagePlan:
    """FastV as its official code runs: layer ``K-1`` in eager attention ranks, ``floor((1-R) N)``
    image tokens are kept from layer ``K`` on, at their original positions."""
    from redundancy.schedule import kept_count

    image = _layout(model, inputs)
    batch, length = inputs["input_ids"].shape
    layers = adapter_for(model).num_layers
    if not 1 <= K < layers:
        raise ValueError(f"fastv_eager: K={K} is outside [1, {layers - 1}]")
    places = image.nonzero().flatten()
    keep = kept_count(len(places), 1.0 - R)
    every = torch.arange(length).expand(batch, length)
    kept = every[:, : length - len(places) + keep]  # shape only: the gather is chosen at run time
    return StagePlan([(0, K), (K, layers)], [None, None], [every, kept], [0, 0], eager_rank=(places, keep))


class _Runner:
    """The language model's forward under a :class:`StagePlan`."""

    def __init__(self, model: Any, plan: StagePlan) -> None:
        self.adapter = adapter_for(model)
        self.plan = plan
        dev = next(model.parameters()).device
        self.gathers = [None if g is None else g.to(dev) for g in plan.gathers]
        self.positions = [p.to(dev) for p in plan.positions]
        self.places = None if plan.eager_rank is None else plan.eager_rank[0].to(dev)
        self.length = 0  # prompt length of the last prefill
        self.decoded = 0
        self._eager_choice: torch.Tensor | None = None  # fastv_eager: the kept slots of the last prefill

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **_: Any,
    ) -> Any:
        from transformers.cache_utils import DynamicCache
        from transformers.modeling_outputs import BaseModelOutputWithPast

        lm = self.adapter.language_model
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_tokens(input_ids)
        cache = past_key_values if past_key_values is not None else DynamicCache(config=lm.config)
        if cache.get_seq_length() == 0:
            hidden = self._prefill(hidden, cache)
        else:
            hidden = self._decode(hidden, cache)
        return BaseModelOutputWithPast(last_hidden_state=lm.norm(hidden), past_key_values=cache)

    def _layers(self, hidden: torch.Tensor, start: int, end: int, pos: torch.Tensor, cache: Any,
                pe: tuple[torch.Tensor, torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layers ``start..end-1``; no mask: the kernel's own causal path (SDPA, flash)."""
        layers = self.adapter.layers
        if pe is None:
            pe = self.adapter.language_model.rotary_emb(hidden, position_ids=pos)
        for li in range(start, end):
            hidden = layers[li](hidden, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
                                position_embeddings=pe)
        return hidden

    def _prefill(self, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        self.length, self.decoded = hidden.shape[1], 0
        for s, (start, end) in enumerate(self.plan.bounds):
            gather, pos = self.gathers[s], self.positions[s]
            if s == 1 and self._eager_choice is not None:
                gather = pos = self._eager_choice
            if gather is not None:
                hidden = gather_rows(hidden, gather)
            if s == 0 and self.places is not None:
                hidden = self._layers(hidden, start, end - 1, pos, cache)
                hidden = self._eager_rank(hidden, end - 1, pos, cache)
            else:
                hidden = self._layers(hidden, start, end, pos, cache)
        return hidden

    def _eager_rank(self, hidden: torch.Tensor, li: int, pos: torch.Tensor, cache: Any) -> torch.Tensor:
        """Layer ``li`` in eager attention with its attention weights; keeps the top image tokens."""
        assert self.places is not None and self.plan.eager_rank is not None
        attn = self.adapter.layers[li].self_attn
        seen: list[torch.Tensor] = []
        handle = attn.register_forward_hook(lambda module, args, out: seen.append(out[1]))
        configs = self.adapter.attention_configs()
        before = [cfg._attn_implementation_internal for cfg in configs]
        for cfg in configs:
            cfg._attn_implementation_internal = "eager"
        n = hidden.shape[1]
        causal = torch.full((n, n), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device).triu(1)
        try:  # eager attention takes its causality from the mask
            hidden = self._layers(hidden, li, li + 1, pos, cache, mask=causal[None, None])
        finally:
            handle.remove()
            for cfg, impl in zip(configs, before):
                cfg._attn_implementation_internal = impl
        scores = seen[0][:, :, -1, :].float().mean(1)[:, self.places]  # [batch, N]: the last token's row
        top = self.places[scores.topk(self.plan.eager_rank[1], dim=1).indices]
        text = torch.ones(hidden.shape[1], dtype=torch.bool, device=hidden.device)
        text[self.places] = False
        rows = text.nonzero().flatten().expand(hidden.shape[0], -1)
        self._eager_choice = torch.cat([rows, top], dim=1).sort(dim=1).values
        return hidden

    def _decode(self, hidden: torch.Tensor, cache: Any) -> torch.Tensor:
        b, q, _ = hidden.shape
        first = self.length + self.decoded
        self.decoded += q
        rotary: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (start, end), shift in zip(self.plan.bounds, self.plan.shifts):
            if shift not in rotary:
                pos = torch.arange(first + shift, first + shift + q, device=hidden.device).expand(b, q)
                rotary[shift] = (pos, self.adapter.language_model.rotary_emb(hidden, position_ids=pos))
            pos, pe = rotary[shift]
            hidden = self._layers(hidden, start, end, pos, cache, pe)
        return hidden


@contextlib.contextmanager
def staged(model: Any, plan: StagePlan) -> Iterator[None]:
    """Within the block the model's language model runs ``plan`` (prefill and decoding)."""
    lm: nn.Module = adapter_for(model).language_model
    if "forward" in lm.__dict__:
        raise RuntimeError("the language model's forward is already replaced (a drop schedule is applied?)")
    runner = _Runner(model, plan)
    lm.forward = functools.partial(_call, runner)
    try:
        yield
    finally:
        del lm.forward


def _call(runner: _Runner, *args: Any, **kwargs: Any) -> Any:
    return runner.forward(*args, **kwargs)


__all__ = ["StagePlan", "fastv_eager_plan", "ideal_plan", "staged"]
