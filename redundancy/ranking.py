"""Ranking image tokens: the attention score (docs/method.md section 3) and the controls.

Everything here is a pure tensor function. The attention score is computed from
a few query rows against the keys, never from a full attention matrix:

    score_i = mean_h softmax_j(q_h . k_{h,j} / sqrt(d_head))[i]

for the keys ``j`` the query can see, in float32, after rotary embedding, with
key heads shared by ``heads / kv_heads`` query heads (grouped-query attention).
Several query rows (instruction mode, training) are averaged with weights.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TypeVar

import numpy as np
import torch

_ROW_CHUNK = 256  # query rows scored at once: [batch, heads, 256, keys] float32 at most


def query_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    visible: torch.Tensor | None,
    weights: torch.Tensor | None,
    scaling: float,
) -> torch.Tensor:
    """Attention paid by the selected query rows to every key, averaged over heads and rows.

    Args:
        query: ``[batch, heads, n_query, head_dim]`` query rows (after rotary).
        keys: ``[batch, kv_heads, n_key, head_dim]`` keys (after rotary).
        visible: ``[batch, n_query, n_key]`` bool, which keys each query row may see; ``None``:
            every key (one query row at the last slot of an unpadded row).
        weights: ``[batch, n_query]`` row weights summing to 1 per sample (0 for padding rows);
            ``None``: the rows weigh alike.
        scaling: softmax temperature, ``1 / sqrt(head_dim)`` for the models here.

    Returns:
        ``[batch, n_key]`` float32 attention; each row sums to 1 over visible keys.
    """
    b, h, nq, dh = query.shape
    if nq > _ROW_CHUNK:  # many rows (``mean``): bounded memory, the same sum chunk by chunk
        if weights is None:
            weights = query.new_full((b, nq), 1.0 / nq, dtype=torch.float32)
        parts = [
            query_attention(query[:, :, i : i + _ROW_CHUNK], keys,
                            None if visible is None else visible[:, i : i + _ROW_CHUNK],
                            weights[:, i : i + _ROW_CHUNK], scaling)
            for i in range(0, nq, _ROW_CHUNK)
        ]
        return torch.stack(parts).sum(0)
    kvh = keys.shape[1]
    groups = h // kvh
    with torch.no_grad():
        q = query.detach().float().reshape(b, kvh, groups * nq, dh)  # head h = kv_head * groups + g
        k = keys.detach().float()
        logits = torch.matmul(q, k.transpose(-1, -2)) * scaling  # [batch, kv_heads, groups*query, key]
        logits = logits.view(b, kvh, groups, nq, -1)
        if visible is not None:  # rows with no visible key (padding rows) get weight 0; keep them finite
            logits = logits.masked_fill(~visible[:, None, None, :, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1)  # [batch, kv_heads, groups, query, key]
        if visible is not None:
            probs = probs.nan_to_num(0.0)
        per_row = probs.mean(dim=(1, 2))  # [batch, query, key]
        if weights is None:
            return per_row.mean(dim=1)
        return (per_row * weights.float()[:, :, None]).sum(dim=1)


SINK_NORM_RATIO = 20.0
"""An image token is a sink (``nosink`` rankers) when the L2 norm of its hidden state is at
least this many times the median norm of the sample's image tokens present (docs/method.md
section 3): massive activations are hundreds of times the typical value, content tokens vary
within a few times it."""


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, heads, n, head_dim]`` after the half-split rotary embedding ``(cos, sin)``
    ``[batch, n, head_dim]``: the numbers of HF's ``apply_rotary_pos_emb`` (``x cos +
    rotate_half(x) sin``) bit for bit, computed half by half into one output, so that the whole
    tensor is not negated and concatenated before it is multiplied (a third of the time on a CPU)."""
    half = x.shape[-1] // 2
    c, s = cos[:, None], sin[:, None]
    first, second = x[..., :half], x[..., half:]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.sub(first * c[..., :half], second * s[..., :half], out=out[..., :half])
    torch.add(second * c[..., half:], first * s[..., half:], out=out[..., half:])
    return out


def unrotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x`` ``[batch, heads, n, head_dim]`` before the rotary embedding ``(cos, sin)``
    ``[batch, n, head_dim]`` (half-split rotary, ``x' = x cos + rotate_half(x) sin``), in float32:
    each pair ``(i, i + head_dim/2)`` is rotated back by its angle (divided by ``cos^2 + sin^2``,
    1 unless the rope type scales the attention)."""
    x = x.float()
    c, s = cos.float()[:, None], sin.float()[:, None]
    half = x.shape[-1] // 2
    turned = torch.cat((x[..., half:], -x[..., :half]), dim=-1)  # rotate_half(x) by -90 degrees
    return (x * c + turned * s) / (c * c + s * s)


def sink_scores(attention: torch.Tensor, sinks: torch.Tensor, keep: bool) -> torch.Tensor:
    """``attention`` (in ``[0, 1]``) with the ``sinks`` scored 2 (``keep``: kept before every other
    token) or -1 (dropped first). Finite, so that :func:`select_top` still tells them from the
    tokens that are not candidates."""
    return attention.masked_fill(sinks, 2.0 if keep else -1.0)


def sink_mask(hidden: torch.Tensor, candidates: torch.Tensor, ratio: float = SINK_NORM_RATIO) -> torch.Tensor:
    """``[batch, n]`` bool: the candidates (image tokens present) whose hidden-state norm
    (``hidden`` ``[batch, n, d]``) is at least ``ratio`` times the median norm of the row's
    candidates (:data:`SINK_NORM_RATIO`)."""
    norms = hidden.detach().float().norm(dim=-1).masked_fill(~candidates, float("nan"))
    median = norms.nanmedian(dim=1, keepdim=True).values
    return candidates & (norms >= ratio * median)


def cls_attention(query: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[n_images, tokens - 1]`` float32 attention of the [CLS] query ``query`` ``[n_images,
    heads, 1, head_dim]`` over the patches (``keys`` ``[n_images, heads, tokens, head_dim]``, CLS
    first), softmax over every token, mean over heads (the ``vision_cls`` score)."""
    with torch.no_grad():
        logits = torch.matmul(query.detach().float(), keys.detach().float().transpose(-1, -2)) * scaling
        return torch.softmax(logits, dim=-1).mean(dim=1)[:, 0, 1:]


def select_top(scores: torch.Tensor, candidates: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Mark the ``counts[b]`` highest-scored candidates of each row.

    Ties go to the earlier position (stable sort), so a batched run and a
    one-by-one run pick the same tokens whatever the padding.

    Args:
        scores: ``[batch, n]`` float scores.
        candidates: ``[batch, n]`` bool, the tokens that may be kept (image tokens present).
        counts: ``[batch]`` long, how many to keep per row (<= candidates per row).

    Returns:
        ``[batch, n]`` bool mask of the kept candidates.
    """
    masked = scores.float().masked_fill(~candidates, float("-inf"))
    order = torch.sort(masked, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return (rank < counts[:, None]) & candidates


def random_scores(n_image: int, seed: int, stage: int, row_key: bytes) -> torch.Tensor:
    """Seeded uniform scores over a sample's original image tokens (the ``random`` control).

    The generator depends on the seed, the stage and the sample's own prompt (``row_key``), not
    on its place in the batch. The sweep gives every point its own seed, derived from the
    checkpoint, the boundary layers, the ratios and the seed index
    (:meth:`redundancy.schedule.DropSchedule.seeded`), so layers and ratios never share a draw.
    """
    digest = hashlib.blake2b(row_key + f"|{seed}|{stage}".encode(), digest_size=8).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return torch.rand(n_image, generator=gen)


@lru_cache(maxsize=64)
def _bayer(size: int) -> np.ndarray:
    """Bayer ordered-dither matrix of side ``size`` (a power of two): every prefix
    ``{cells with value < k}`` is spread evenly over the square."""
    m = np.zeros((1, 1), dtype=np.int64)
    while m.shape[0] < size:
        m = np.block([[4 * m, 4 * m + 2], [4 * m + 3, 4 * m + 1]])
    return m


def grid_priority(height: int, width: int) -> torch.Tensor:
    """Raster-order priorities (lower = kept first) of a ``height x width`` token grid
    such that the top ``k`` form a spatially even subsample for every ``k``."""
    side = 1
    while side < max(height, width):
        side *= 2
    crop = _bayer(side)[:height, :width].reshape(-1)
    ranks = np.empty_like(crop)
    ranks[np.argsort(crop, kind="stable")] = np.arange(crop.size)
    return torch.from_numpy(ranks.astype(np.float32) / max(crop.size, 1))


def sequence_priority(n: int) -> torch.Tensor:
    """Even spacing over a 1-D sequence of ``n`` tokens (van der Corput order), the
    fallback when the image grid is unknown."""
    bits = max(1, (n - 1).bit_length())
    idx = np.arange(n)
    rev = np.zeros(n, dtype=np.int64)
    for b in range(bits):
        rev |= ((idx >> b) & 1) << (bits - 1 - b)
    ranks = np.empty(n, dtype=np.int64)
    ranks[np.argsort(rev, kind="stable")] = np.arange(n)
    return torch.from_numpy(ranks.astype(np.float32) / max(n, 1))


T = TypeVar("T")
Grid = tuple[int, int]
"""``(height, width)`` of one token grid (an image, a crop, a frame) in raster order."""


def pack_rows(n_image: Sequence[int], images: Sequence[Sequence[T]], size: Callable[[T], int]) -> list[list[T] | None]:
    """Per row, the parts (grids, crops, frames) of the images it holds, in order: ``images`` lists
    each image's parts in batch order, images packed row after row, ``size(part)`` tokens each;
    ``None`` for a row whose token count does not match."""
    out: list[list[T] | None] = []
    it = iter(images)
    for n in n_image:
        parts: list[T] = []
        total = 0
        while total < n:
            image = next(it, None)
            if image is None:
                break
            parts += list(image)
            total += sum(size(p) for p in image)
        out.append(parts if parts and total == n else None)
    return out


def row_grids(n_image: Sequence[int], images: Sequence[Sequence[Grid]]) -> list[list[Grid] | None]:
    """Per row, the grids of the images it holds (:func:`pack_rows`); ``None`` for a row whose
    token count does not match (its grid is unknown)."""
    return pack_rows(n_image, images, lambda g: g[0] * g[1])


def grid_priorities(grids: Sequence[Grid] | None, n: int) -> torch.Tensor:
    """The ``uniform`` priorities of a row's ``n`` tokens laid out as ``grids`` (each grid
    subsampled alike, :func:`grid_priority`); :func:`sequence_priority` when the grid is unknown."""
    if grids is None:
        return sequence_priority(n)
    return torch.cat([torch.zeros(0), *(grid_priority(h, w) for h, w in grids)])


def grid_cells(grids: Sequence[Grid] | None, n: int) -> torch.Tensor:
    """``[n, 3]`` long ``(grid, row, column)`` of a row's ``n`` tokens laid out as ``grids``, end
    to end; one ``1 x n`` grid (the sequence) when the grid is unknown."""
    grids = [(1, n)] if grids is None else grids
    parts = [torch.zeros(0, 3, dtype=torch.long)]
    for g, (h, w) in enumerate(grids):
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([torch.full((h * w,), g), rows.flatten(), cols.flatten()], dim=1))
    return torch.cat(parts)


_POOL_CHUNK = 512  # tokens assigned to their windows at once: a [512, kept] cost matrix


def pool_windows(cells: torch.Tensor, priority: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """The ``pool`` baseline's windows at each boundary (docs/method.md section 3).

    At boundary ``s`` the ``counts[s]`` tokens of lowest ``priority`` are kept (the ``uniform``
    selection, ties to the earlier token); every token present (the ``counts[s-1]`` lowest,
    all at the first boundary) joins the window of its nearest kept token: the one in the same
    grid at the smallest squared distance on it, ties to the earlier kept token; a grid with no
    kept token joins the kept token nearest in the sequence (ties: the earlier). Each window is thus
    a cell of a Voronoi partition of the grid: on a ``2h x 2w``
    grid keeping a quarter, the ``2 x 2`` blocks of average pooling, the kept token at the top left.

    Args:
        cells: ``[n, 3]`` long ``(grid, row, column)`` of each token (:func:`grid_cells`).
        priority: ``[n]`` the ``uniform`` priorities (lower = kept first).
        counts: tokens kept at each boundary (non-increasing).

    Returns:
        ``[boundaries, n]`` long: the index of the kept token whose window holds each token
        present at that boundary; -1 for tokens no longer present (or all dropped).
    """
    n = cells.shape[0]
    order = torch.sort(priority.float(), stable=True).indices
    out = torch.full((len(counts), n), -1, dtype=torch.long)
    present = n
    index = torch.arange(n)
    for s, k in enumerate(counts):
        members = order[:present]
        kept = torch.sort(order[:k]).values
        present = k
        if k == 0:
            continue
        for lo in range(0, len(members), _POOL_CHUNK):
            who = members[lo : lo + _POOL_CHUNK]
            a, b = cells[who][:, None, :], cells[kept][None, :, :]
            other = (a[..., 0] != b[..., 0]).long()
            dist = ((a[..., 1:] - b[..., 1:]) ** 2).sum(-1) * (1 - other)
            gap = (index[who][:, None] - kept[None, :]).abs() * other
            cost = (other << 60) | (dist << 30) | gap  # lexicographic: grid, distance on it, sequence gap
            out[s, who] = kept[cost.argmin(dim=1)]  # the first minimum: the earlier kept token
    return out


def pool_states(
    hidden: torch.Tensor, window: torch.Tensor, ordinal: torch.Tensor, present: torch.Tensor
) -> torch.Tensor:
    """``hidden`` ``[batch, n, d]`` with each kept image token's state replaced by the mean (in
    float32 at least) of the states of the tokens in its window (the ``pool`` baseline).

    Args:
        window: ``[batch, N]`` long, per original image-token index the index of its window's
            kept token (:func:`pool_windows`; -1 where not present).
        ordinal: ``[batch, n]`` the original image-token index of each slot.
        present: ``[batch, n]`` bool, the image tokens present.
    """
    b, _, d = hidden.shape
    width = window.shape[1]
    target = window.gather(1, ordinal.clamp(min=0, max=width - 1))
    member = present & (target >= 0)
    target = torch.where(member, target, width)  # the others: a spare bin, counted nowhere
    exact = torch.promote_types(hidden.dtype, torch.float32)
    sums = hidden.new_zeros(b, width + 1, d, dtype=exact)
    sums = sums.scatter_add(1, target[..., None].expand(-1, -1, d), hidden.to(exact))
    sizes = torch.zeros(b, width + 1, dtype=exact, device=hidden.device).scatter_add(1, target, member.to(exact))
    own = torch.where(present, ordinal.clamp(min=0, max=width - 1), width)
    size = sizes.gather(1, own)
    mean = sums.gather(1, own[..., None].expand(-1, -1, d)) / size.clamp(min=1)[..., None]
    return torch.where((size > 0)[..., None], mean.to(hidden.dtype), hidden)


def pack_priorities(n_image: Sequence[int], images: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per row, the priorities of the images it holds, concatenated (:func:`pack_rows`); a row
    whose token count does not match falls back to :func:`sequence_priority`."""
    return [torch.cat(parts) if parts else sequence_priority(n)
            for parts, n in zip(pack_rows(n_image, images, len), n_image)]
