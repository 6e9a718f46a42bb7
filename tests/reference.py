"""A slow, plain reference for the drop engine (tests only).

Everything here is written to be obviously right rather than fast:

* one sample at a time (batch 1, no padding), no KV cache: every call recomputes
  the whole pruned forward pass;
* a Python loop over the HF decoder layers of the language model, each layer's
  attention computed by hand (q/k/v projections, rotary, grouped-query key heads
  repeated, an explicit full causal float mask, softmax in the model's dtype);
* dropping by explicit index selection with Python lists of kept original indices;
* the ranking score computed from the same q/k, one query row at a time, in
  float64, with the ties going to the earlier image token.

It does not import :mod:`redundancy.engine` or :mod:`redundancy.ranking`; it uses
:class:`~redundancy.schedule.DropSchedule` and :func:`~redundancy.schedule.kept_count`
only, so a bug in the engine's ranking or bookkeeping cannot hide in here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from redundancy.schedule import DropSchedule, kept_count

ATTENTION_RANKERS = ("last", "instruction", "mean", "norope", "nosink", "nosink_keep", "inverse")
SINK_RATIO = 20.0  # docs/method.md section 3: a sink's hidden-state norm is >= 20 x the median image token's


# ------------------------------------------------------------ multimodal merge
class _Captured(Exception):
    """Stops the forward pass once the language model's input is captured."""


def merged_inputs_embeds(model, input_ids, pixel_values, image_sizes=None) -> torch.Tensor:
    """The model's own ``inputs_embeds`` ``[1, L, d]`` (text embeddings with the image
    features scattered in), captured at the entrance of the language model.

    The capture keeps the autograd graph, so a loss built on it back-propagates
    into the projector and the vision tower.
    """
    lm = model.model.language_model
    box: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs):
        box["embeds"] = kwargs["inputs_embeds"]
        raise _Captured

    handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        extra = {} if image_sizes is None else {"image_sizes": image_sizes}
        model.model(input_ids=input_ids, pixel_values=pixel_values, use_cache=False, **extra)
    except _Captured:
        pass
    finally:
        handle.remove()
    return box["embeds"]


# ------------------------------------------------------------ one decoder layer
def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [heads, n, head_dim]; cos/sin [n, head_dim]
    return x * cos[None] + _rotate_half(x) * sin[None]


def qkv(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Queries, keys (after rotary) and values of ``layer`` for ``hidden`` ``[n, d]``:
    ``q [heads, n, hd]``, ``k/v [kv_heads, n, hd]``."""
    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(hidden)
    n = x.shape[0]
    q = attn.q_proj(x).view(n, -1, hd).transpose(0, 1)
    k = attn.k_proj(x).view(n, -1, hd).transpose(0, 1)
    v = attn.v_proj(x).view(n, -1, hd).transpose(0, 1)
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def qk_plain(layer, hidden: torch.Tensor):
    """Queries ``[heads, n, hd]`` and keys ``[kv_heads, n, hd]`` of ``layer`` for its input
    ``hidden`` ``[n, d]``, with no rotary embedding (the ``norope`` ranker)."""
    attn = layer.self_attn
    hd = attn.head_dim
    x = layer.input_layernorm(hidden)
    n = x.shape[0]
    return attn.q_proj(x).view(n, -1, hd).transpose(0, 1), attn.k_proj(x).view(n, -1, hd).transpose(0, 1)


def causal_float_mask(n: int, dtype: torch.dtype, device=None) -> torch.Tensor:
    """``[n, n]``: 0 where key ``j <= i`` (query ``i`` may look), ``-inf`` elsewhere."""
    mask = torch.zeros(n, n, dtype=dtype, device=device)
    for i in range(n):
        mask[i, i + 1 :] = float("-inf")
    return mask


def layer_forward(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """One decoder layer on ``hidden`` ``[n, d]``; returns the output and the layer's ``q, k``."""
    attn = layer.self_attn
    q, k, v = qkv(layer, hidden, cos, sin)
    groups = q.shape[0] // k.shape[0]
    k_rep = k.repeat_interleave(groups, dim=0)  # query head h uses key head h // groups
    v_rep = v.repeat_interleave(groups, dim=0)
    n = hidden.shape[0]
    logits = q @ k_rep.transpose(-1, -2) * attn.scaling + causal_float_mask(n, q.dtype, q.device)[None]
    probs = torch.softmax(logits, dim=-1)
    out = (probs @ v_rep).transpose(0, 1).reshape(n, -1)
    hidden = hidden + attn.o_proj(out)
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, q, k


def attention_row(q: torch.Tensor, k: torch.Tensor, row: int, scaling: float, excluded=()) -> torch.Tensor:
    """``[n]`` attention of query row ``row`` over every key, mean over heads, float64.

    Only keys ``0..row`` are visible (causal), less the slots in ``excluded``; the others get 0.
    """
    q = q.detach().double()
    k = k.detach().double()
    groups = q.shape[0] // k.shape[0]
    seen = [j for j in range(row + 1) if j not in excluded]
    heads = []
    for h in range(q.shape[0]):
        kh = k[h // groups, seen]  # [visible, hd]
        heads.append(torch.softmax(kh @ q[h, row] * scaling, dim=-1))
    mean = torch.stack(heads).mean(0)
    out = torch.zeros(k.shape[1], dtype=torch.float64)
    out[seen] = mean.cpu()
    return out


def sink_slots(hidden: torch.Tensor, image_slots: list[int]) -> list[int]:
    """The image slots whose hidden-state norm is at least :data:`SINK_RATIO` times the
    median (the lower middle value for an even count) of the image slots' norms."""
    norms = {j: float(hidden[j].detach().double().norm()) for j in image_slots}
    ordered = sorted(norms.values())
    median = ordered[(len(ordered) - 1) // 2]
    return [j for j in image_slots if norms[j] >= SINK_RATIO * median]


def ranking_attention(ranker, q, k, plain_q, plain_k, scaling, rows, image_slots, hidden) -> torch.Tensor:
    """``[n]`` float64 score of every slot at a boundary under an attention ranker: the mean
    attention of the query slots ``rows``, from ``q/k`` (after rotary) or, for ``norope``,
    ``plain_q/plain_k`` (before); the ``nosink`` rankers leave the sink slots among
    ``image_slots`` (by the norm of ``hidden``, the states leaving the ranking layer) out of
    every softmax and score them -1 (``nosink``: below every attention) or 2 (``nosink_keep``: above)."""
    if ranker == "norope":
        q, k = plain_q, plain_k
    sinks = sink_slots(hidden, image_slots) if ranker in ("nosink", "nosink_keep") else []
    att = torch.zeros(k.shape[1], dtype=torch.float64)
    for r in rows:
        att += attention_row(q, k, r, scaling, excluded=set(sinks))
    att /= len(rows)
    att[sinks] = 2.0 if ranker == "nosink_keep" else -1.0
    return -att if ranker == "inverse" else att


def reference_cls_scores(model, pixel_values) -> list[float]:
    """The ``vision_cls`` score of every patch of every image, in order (float64): the CLIP
    layer whose output LLaVA uses (``vision_feature_layer``) recomputed by hand from its input,
    the full attention matrix of every head, row 0 ([CLS]) averaged over heads, CLS column cut."""
    tower = model.model.vision_tower
    layers = getattr(tower, "vision_model", tower).encoder.layers
    feature = model.config.vision_feature_layer  # hidden_states[j] is the output of layer j - 1
    index = (feature if feature >= 0 else len(layers) + 1 + feature) - 1
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states[index]  # layer `index`'s input
        layer = layers[index]
        attn = layer.self_attn
        out: list[float] = []
        for image in hidden:
            x = layer.layer_norm1(image).double()  # [tokens, d_v]
            q = torch.nn.functional.linear(x, attn.q_proj.weight.double(), attn.q_proj.bias.double())
            k = torch.nn.functional.linear(x, attn.k_proj.weight.double(), attn.k_proj.bias.double())
            heads = []
            for h in range(attn.num_heads):
                cols = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
                full = torch.softmax(q[:, cols] @ k[:, cols].T * attn.head_dim**-0.5, dim=-1)  # [tokens, tokens]
                heads.append(full[0])
            out += torch.stack(heads).mean(0)[1:].tolist()
    return out


# ----------------------------------------------------------------- the forward
@dataclass
class RefResult:
    logits: torch.Tensor
    """``[n_final, vocab]`` logits of the tokens present after the last boundary."""
    positions: list[int]
    """Original sequence index of each row of ``logits`` (and ``hidden``)."""
    length: int
    kept: list[list[int]] = field(default_factory=list)
    """Per boundary, sorted original image-token indices (0..N-1) kept from it on."""
    scores: list[torch.Tensor] = field(default_factory=list)
    """Per boundary, ``[N]`` float64 score (higher = kept first; NaN for tokens already
    dropped); empty when ``kept`` was given."""
    n_image: int = 0
    position_ids: list[list[int]] = field(default_factory=list)
    """Per stage, the position ids its layers used."""

    def full_logits(self) -> torch.Tensor:
        """``[L, vocab]`` logits at the original length, NaN at dropped positions."""
        out = torch.full((self.length, self.logits.shape[-1]), float("nan"), dtype=self.logits.dtype)
        out[self.positions] = self.logits.detach().cpu()
        return out


def _as_row(t: torch.Tensor | None) -> list[int] | None:
    if t is None:
        return None
    t = torch.as_tensor(t)
    if t.dim() == 2:
        assert t.shape[0] == 1, "the reference runs one sample at a time"
        t = t[0]
    return [int(x) for x in t.tolist()]


def query_rows(ids: list[int], image_token_id: int, ranker: str, labels: list[int] | None) -> list[int]:
    """Original indices of the ranking query rows (docs/method.md section 3)."""
    L = len(ids)
    rows: list[int] = []
    if labels is not None:
        rows = [i for i in range(L - 1) if labels[i] == -100 and labels[i + 1] != -100]
    if not rows:
        rows = [L - 1]
    if ranker == "mean":  # every token from the first image token to the last query, answers excluded
        first_img = min(i for i in range(L) if ids[i] == image_token_id)
        return [i for i in range(first_img, max(rows) + 1) if labels is None or labels[i] == -100]
    if ranker == "instruction":
        last_img = max(i for i in range(L) if ids[i] == image_token_id)
        last_q = max(rows)
        for i in range(last_img + 1, last_q + 1):
            is_answer = labels is not None and labels[i] != -100
            if ids[i] != image_token_id and not is_answer and i not in rows:
                rows.append(i)
        rows.sort()
    return rows


def reference_run(
    model,
    input_ids,
    pixel_values,
    schedule: DropSchedule,
    kept: list[list[int]] | None = None,
    labels=None,
    image_sizes=None,
) -> RefResult:
    """The pruned forward pass of one sample under ``schedule``.

    ``kept`` (one sorted list of original image-token indices per boundary) replaces
    the ranking: the forward then uses exactly those tokens (decoding checks).
    """
    ids = _as_row(input_ids)
    lab = _as_row(labels)
    ids_2d = torch.tensor([ids], device=model.device)
    embeds = merged_inputs_embeds(model, ids_2d, pixel_values, image_sizes)[0]  # [L, d]
    lm = model.model.language_model
    layers = list(lm.layers)
    schedule.validate_for(len(layers))
    image_token_id = int(model.config.image_token_id)
    L = len(ids)
    image_pos = [i for i in range(L) if ids[i] == image_token_id]
    N = len(image_pos)
    ordinal = {p: j for j, p in enumerate(image_pos)}  # original index -> image-token index
    ranker = schedule.ranker
    if not schedule.is_vanilla:
        assert N > 0, "the schedule needs image tokens"
    if kept is None and not schedule.is_vanilla:
        assert ranker in (*ATTENTION_RANKERS, "vision_cls"), f"the reference does not rank by {ranker!r}"
    cls = reference_cls_scores(model, pixel_values) if ranker == "vision_cls" and kept is None else None
    rows = query_rows(ids, image_token_id, ranker, lab) if N else [L - 1]

    cur = list(range(L))  # original indices present, in order
    hidden = embeds
    res = RefResult(logits=torch.empty(0), positions=[], length=L, n_image=N)
    starts = [0, *schedule.boundaries, len(layers)]
    for s in range(len(starts) - 1):
        if schedule.positions == "keep":
            pos = list(cur)
        else:
            pos = list(range(len(cur)))
        res.position_ids.append(pos)
        pos_t = torch.tensor([pos], device=hidden.device)
        cos, sin = lm.rotary_emb(hidden[None], position_ids=pos_t)
        cos, sin = cos[0], sin[0]
        q_last = k_last = h_in = None
        for li in range(starts[s], starts[s + 1]):
            h_in = hidden
            hidden, q_last, k_last = layer_forward(layers[li], hidden, cos, sin)
        if s == len(schedule.boundaries):
            break

        boundary = starts[s + 1]
        present = [ordinal[p] for p in cur if p in ordinal]  # image tokens still here
        if kept is not None:
            keep = sorted(int(j) for j in kept[s])
            assert set(keep) <= set(present), "a given kept set brings back a dropped token"
            assert len(keep) == kept_count(N, schedule.ratios[s])
        elif cls is not None:  # vision_cls: the vision tower's score, the same at every boundary
            assert len(cls) == N
            score = torch.tensor([cls[j] if j in present else float("nan") for j in range(N)], dtype=torch.float64)
            keep = sorted(sorted(present, key=lambda j: (-cls[j], j))[: kept_count(N, schedule.ratios[s])])
            res.scores.append(score)
        else:
            rank_layer = layers[boundary - 1] if schedule.rank_layer == "stage_last" else layers[boundary]
            with torch.no_grad():
                if schedule.rank_layer == "stage_last":
                    q, k = q_last, k_last
                    plain_q, plain_k = qk_plain(rank_layer, h_in)
                else:  # "next": layer K's input norm and q/k on the states leaving layer K-1
                    q, k, _ = qkv(rank_layer, hidden, cos, sin)
                    plain_q, plain_k = qk_plain(rank_layer, hidden)
            image_slots = [slot for slot, p in enumerate(cur) if p in ordinal]
            present_rows = [cur.index(r) for r in rows if r in cur]
            att = ranking_attention(
                ranker, q, k, plain_q, plain_k, rank_layer.self_attn.scaling, present_rows, image_slots, hidden
            )
            score = torch.full((N,), float("nan"), dtype=torch.float64)
            for slot, p in enumerate(cur):
                if p in ordinal:
                    score[ordinal[p]] = att[slot]
            count = kept_count(N, schedule.ratios[s])
            order = sorted(present, key=lambda j: (-float(score[j]), j))
            keep = sorted(order[:count])
            res.scores.append(score)
        res.kept.append(keep)
        keep_set = set(keep)
        select = [slot for slot, p in enumerate(cur) if p not in ordinal or ordinal[p] in keep_set]
        hidden = hidden[select]
        cur = [cur[slot] for slot in select]

    hidden = lm.norm(hidden)
    res.logits = model.lm_head(hidden)
    res.positions = cur
    return res


def reference_forward(model, input_ids, pixel_values, schedule, kept=None, labels=None, image_sizes=None):
    """``(logits [L, vocab] with NaN rows at dropped positions, kept per boundary,
    scores per boundary)`` of one sample; see :func:`reference_run`."""
    res = reference_run(model, input_ids, pixel_values, schedule, kept=kept, labels=labels, image_sizes=image_sizes)
    return res.full_logits(), res.kept, res.scores


def reference_loss(model, input_ids, pixel_values, schedule, labels, image_sizes=None, kept=None):
    """Mean next-token cross-entropy on the reduced sequence: labels gathered with the
    kept hidden states, shifted, averaged over the supervised tokens. Returns
    ``(loss, RefResult)``; the loss keeps its autograd graph."""
    res = reference_run(model, input_ids, pixel_values, schedule, kept=kept, labels=labels, image_sizes=image_sizes)
    lab = _as_row(labels)
    kept_labels = torch.tensor([lab[p] for p in res.positions], device=res.logits.device)
    logits = res.logits[:-1]
    target = kept_labels[1:]
    loss = F.cross_entropy(logits.double(), target, ignore_index=-100, reduction="sum")
    n = int((target != -100).sum())
    return loss / n, res


def reference_greedy(
    model, input_ids, pixel_values, schedule, kept, steps: int, image_sizes=None, suppress=()
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by recomputing the whole pruned forward on prompt + generated
    tokens at every step with the fixed ``kept`` sets. Returns the new tokens and the
    logits of the last position at every step."""
    ids = _as_row(input_ids)
    new: list[int] = []
    step_logits: list[torch.Tensor] = []
    for _ in range(steps):
        res = reference_run(model, ids + new, pixel_values, schedule, kept=kept, image_sizes=image_sizes)
        assert res.positions[-1] == len(ids) + len(new) - 1
        last = res.logits[-1].detach().cpu()
        step_logits.append(last)
        pick = last.clone()
        for t in suppress:
            pick[t] = -math.inf
        new.append(int(pick.argmax()))
    return new, step_logits


# ------------------------------------------------------------------ test inputs
def image_token_count(model, pixel_values, image_sizes=None) -> int:
    """How many image tokens the model's merge expects for ``pixel_values`` (one sample)."""
    with torch.no_grad():
        extra = {} if image_sizes is None else {"image_sizes": image_sizes}
        feats = model.model.get_image_features(pixel_values=pixel_values, return_dict=True, **extra).pooler_output
    return sum(int(f.shape[0]) for f in feats)


def make_sample(
    model,
    *,
    before: int = 3,
    after: int = 4,
    image_hw: tuple[int, int] = (28, 56),
    n_images: int = 1,
    seed: int = 0,
):
    """A random prompt ``[BOS, before text, <image tokens>, after text]`` for a tiny
    model: ``(input_ids [1, L], pixel_values, image_sizes or None)``.

    Text ids avoid 0 (pad), 1 (bos), 2 (eos) and the image token. LLaVA: ``n_images``
    images of 16 tokens each, separated by two text tokens; LLaVA-NeXT: one image of
    ``image_hw`` pixels (any-res crops + newlines), padded to 5 crops like the processor.
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = model.config
    vocab = cfg.text_config.vocab_size
    image_id = int(cfg.image_token_id)
    side = cfg.vision_config.image_size
    dtype = model.dtype

    def text(n):
        ids = torch.randint(3, vocab - 1, (n,), generator=gen)
        assert not (ids == image_id).any()
        return ids.tolist()

    if cfg.model_type == "llava":
        pixel_values = torch.randn(n_images, 3, side, side, generator=gen).to(dtype)
        image_sizes = None
    else:
        assert n_images == 1
        pixel_values = torch.randn(1, 5, 3, side, side, generator=gen).to(dtype)
        image_sizes = torch.tensor([list(image_hw)])
    n = image_token_count(model, pixel_values, image_sizes) // n_images
    ids = [1, *text(before)]
    for i in range(n_images):
        ids += [image_id] * n + (text(2) if i < n_images - 1 else [])
    ids += text(after)
    return torch.tensor([ids]), pixel_values, image_sizes


_MODELS: dict = {}


def tiny_model(
    family: str = "llava", text: str = "llama", impl: str = "sdpa", dtype=torch.float64, seed: int = 0,
    kv_heads: int = 2,
):
    """A cached tiny random model (4 layers, hidden 64, 4 heads / ``kv_heads`` key heads)
    in eval mode. Tests that train or change weights should build their own."""
    from redundancy.models.factory import build_model, tiny_config

    key = (family, text, impl, dtype, seed, kv_heads)
    if key not in _MODELS:
        config = tiny_config(family, text=text, kv_heads=kv_heads)
        _MODELS[key] = build_model(config, attn_implementation=impl, dtype=dtype, seed=seed)
    return _MODELS[key]
