"""A plain reference for Qwen2-VL / Qwen2.5-VL under a drop schedule (tests only): tiny
models, inputs built without a processor, HF's own 3-D positions for ``keep`` and the
bounding-box renumbering of docs/method.md section 4 for ``compact``, the pruned forward
pass recomputed at every step.

Inputs: ``[bos, text, <|vision_start|>, image tokens, <|vision_end|>, text]`` with ``h * w / 4``
image tokens for an image of ``(1, h, w)`` patches, its flattened patches and ``mm_token_type_ids``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from redundancy.models.factory import build_model, tiny_config
from redundancy.schedule import DropSchedule, kept_count
from tests.reference import layer_forward, qk_plain, qkv, query_rows, ranking_attention

Sample = dict[str, torch.Tensor]
_MODELS: dict[tuple[Any, ...], Any] = {}


def qwen_model(family: str = "qwen2_vl", attn: str = "sdpa", dtype: torch.dtype = torch.float64) -> Any:
    """Cached tiny model (4 layers, hidden 64, 4 query heads over 2 key heads); do not mutate."""
    key = (family, attn, dtype)
    if key not in _MODELS:
        _MODELS[key] = build_model(tiny_config(family), attn_implementation=attn, dtype=dtype)
    return _MODELS[key]


def make_sample(model: Any, grid_hw: tuple[int, int], before: int, after: int, seed: int) -> Sample:
    """One prompt with one image of ``(1, *grid_hw)`` patches; text ids avoid pad/bos/eos and the special ids."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    h, w = grid_hw
    n = h * w // cfg.vision_config.spatial_merge_size**2
    text = torch.randint(3, cfg.text_config.vocab_size - 4, (before + after,), generator=gen).tolist()
    image = [cfg.vision_start_token_id, *[cfg.image_token_id] * n, cfg.vision_end_token_id]
    ids = [1, *text[:before], *image, *text[before:]]
    vc = cfg.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    input_ids = torch.tensor([ids])
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": torch.randn(h * w, patch_dim, generator=gen).to(model.dtype),
        "image_grid_thw": torch.tensor([[1, h, w]]),
        "mm_token_type_ids": (input_ids == cfg.image_token_id).int(),
    }


def left_pad(samples: list[Sample]) -> Sample:
    """One left-padded batch (pad id 0) of single samples; images in row order."""
    width = max(s["input_ids"].shape[1] for s in samples)
    out: Sample = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        rows = [torch.nn.functional.pad(s[key], (width - s[key].shape[1], 0)) for s in samples]
        out[key] = torch.cat(rows)
    out["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])
    out["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in samples])
    return out


def extend(sample: Sample, new: list[int]) -> Sample:
    """``sample`` with text tokens ``new`` appended."""
    tail = torch.tensor([new], dtype=torch.long)
    out = dict(sample)
    out["input_ids"] = torch.cat([sample["input_ids"], tail], dim=1)
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    out["mm_token_type_ids"] = torch.cat([sample["mm_token_type_ids"], torch.zeros_like(tail, dtype=torch.int)], dim=1)
    return out


# ---------------------------------------------------------------- reference
class _Captured(Exception):
    pass


def hf_language_inputs(model: Any, sample: Sample) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own language-model input for one sample: ``inputs_embeds`` ``[L, d]`` and the
    3-D positions ``[3, L]`` that ``Qwen2VLModel`` computed (``get_rope_index``)."""
    box: dict[str, torch.Tensor] = {}

    def hook(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        box["embeds"], box["pos"] = kwargs["inputs_embeds"], kwargs["position_ids"]
        raise _Captured

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.model(**sample, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    pos = box["pos"]
    assert pos.shape == (3, 1, sample["input_ids"].shape[1])
    return box["embeds"][0], pos[:, 0]


def compact_reference(ids: list[int], present: list[int], original: torch.Tensor, image_id: int) -> list[list[int]]:
    """``compact`` positions ``[3][n]`` of the present tokens (docs/method.md section 4): the
    numbering ``get_rope_index`` gives the reduced sequence when each image is the bounding
    box of its present tokens. Written from the definition, one token at a time."""
    out: list[list[int]] = []
    cur = int(original[:, present[0]].min())
    k = 0
    while k < len(present):
        p = present[k]
        if ids[p] != image_id:
            out.append([cur, cur, cur])
            cur += 1
            k += 1
            continue
        origin = p  # the image's first original token: cell (0, 0, 0)
        while origin > 0 and ids[origin - 1] == image_id:
            origin -= 1
        run = []
        while k < len(present) and ids[present[k]] == image_id:
            run.append(present[k])
            k += 1
        cells = [[int(original[c, q] - original[c, origin]) for c in range(3)] for q in run]
        low = [min(cell[c] for cell in cells) for c in range(3)]
        out += [[cur + cell[c] - low[c] for c in range(3)] for cell in cells]
        cur += max(max(cell[c] for cell in cells) - low[c] + 1 for c in (1, 2))  # get_rope_index: max(h, w)
    return [[row[c] for row in out] for c in range(3)]


@dataclass
class Ref:
    last_logits: torch.Tensor
    kept: list[list[int]] = field(default_factory=list)
    positions: list[list[list[int]]] = field(default_factory=list)
    """Per stage, ``[3][n]`` the positions its layers used."""
    original: list[list[list[int]]] = field(default_factory=list)
    """Per stage, ``[3][n]`` HF's original positions of the stage's tokens."""
    present: list[int] = field(default_factory=list)
    logits: torch.Tensor | None = None


def reference_run(model: Any, sample: Sample, schedule: DropSchedule, kept: list[list[int]] | None = None) -> Ref:
    """The pruned forward of one unpadded sample without cache: plain layer loop, hand-made
    attention (tests/reference.py), explicit index selection, float64 attention ranking."""
    embeds, original = hf_language_inputs(model, sample)
    ids = sample["input_ids"][0].tolist()
    lm = model.model.language_model
    layers = list(lm.layers)
    image_id = int(model.config.image_token_id)
    image_pos = [i for i, t in enumerate(ids) if t == image_id]
    ordinal = {p: j for j, p in enumerate(image_pos)}
    rows = query_rows(ids, image_id, schedule.ranker, None)
    cur = list(range(len(ids)))
    hidden = embeds
    ref = Ref(last_logits=torch.empty(0))
    starts = [0, *schedule.boundaries, len(layers)]
    for s in range(len(starts) - 1):
        if schedule.positions == "keep" or s == 0:
            pos = original[:, cur].tolist()
        else:
            pos = compact_reference(ids, cur, original, image_id)
        ref.positions.append(pos)
        ref.original.append(original[:, cur].tolist())
        cos, sin = lm.rotary_emb(hidden[None], torch.tensor(pos)[:, None, :])
        cos, sin = cos[0], sin[0]
        for li in range(starts[s], starts[s + 1]):
            h_in = hidden
            hidden, q_last, k_last = layer_forward(layers[li], hidden, cos, sin)
        if s == len(schedule.boundaries):
            break
        boundary = starts[s + 1]
        present = [ordinal[p] for p in cur if p in ordinal]
        if kept is not None:
            keep = kept[s]
        else:
            layer = layers[boundary - 1] if schedule.rank_layer == "stage_last" else layers[boundary]
            with torch.no_grad():
                if schedule.rank_layer == "stage_last":
                    q, k = q_last, k_last
                else:
                    q, k, _ = qkv(layer, hidden, cos, sin)
                    h_in = hidden
                plain_q, plain_k = qk_plain(layer, h_in)
            image_slots = [slot for slot, p in enumerate(cur) if p in ordinal]
            att = ranking_attention(schedule.ranker, q, k, plain_q, plain_k, layer.self_attn.scaling,
                                    [cur.index(r) for r in rows if r in cur], image_slots, hidden)
            score = {ordinal[cur[slot]]: float(att[slot]) for slot in image_slots}
            order = sorted(present, key=lambda j: (-score[j], j))
            keep = sorted(order[: kept_count(len(image_pos), schedule.ratios[s])])
        ref.kept.append(keep)
        select = [slot for slot, p in enumerate(cur) if p not in ordinal or ordinal[p] in set(keep)]
        hidden, cur = hidden[select], [cur[slot] for slot in select]
    ref.logits = model.lm_head(lm.norm(hidden))
    ref.last_logits = ref.logits[-1].detach()
    ref.present = cur
    return ref


def reference_greedy(
    model: Any, sample: Sample, schedule: DropSchedule, kept: list[list[int]], steps: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy decoding by recomputing the pruned forward on prompt + generated tokens."""
    new: list[int] = []
    logits: list[torch.Tensor] = []
    for _ in range(steps):
        with torch.no_grad():
            last = reference_run(model, extend(sample, new), schedule, kept=kept).last_logits
        logits.append(last)
        pick = last.clone()
        pick[model.config.image_token_id] = -math.inf
        new.append(int(pick.argmax()))
    return new, logits
