"""Ranking functions against naive implementations."""

from __future__ import annotations

import torch

from redundancy.ranking import (
    grid_priority,
    query_attention,
    random_scores,
    rotate,
    select_top,
    sequence_priority,
    sink_mask,
    sink_scores,
    unrotate,
)


def test_query_attention_matches_full_softmax_with_gqa() -> None:
    torch.manual_seed(0)
    b, h, kvh, n, dh = 2, 4, 2, 7, 5
    q_all = torch.randn(b, h, n, dh)
    k = torch.randn(b, kvh, n, dh)
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[1, :2] = False
    rows = torch.tensor([[6, 4], [6, 6]])
    weight = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    visible = (torch.arange(n)[None, None, :] <= rows[:, :, None]) & valid[:, None, :]
    q = q_all.gather(2, rows[:, None, :, None].expand(-1, h, -1, dh))
    got = query_attention(q, k, visible, weight, dh**-0.5)
    # naive: repeat kv heads, full attention matrix, causal + padding mask
    k_rep = k.repeat_interleave(h // kvh, dim=1)
    logits = q_all @ k_rep.transpose(-1, -2) * dh**-0.5
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    mask = causal[None, None] & valid[:, None, None, :]
    probs = logits.masked_fill(~mask, float("-inf")).softmax(-1).mean(1)  # [b, n, n]
    expected = torch.stack([0.5 * probs[0, 6] + 0.5 * probs[0, 4], probs[1, 6]])
    torch.testing.assert_close(got, expected)
    assert torch.all(got[1, :2] == 0)


def test_select_top_counts_and_ties() -> None:
    scores = torch.tensor([[0.1, 0.5, 0.5, 0.9, 0.2], [1.0, 1.0, 1.0, 1.0, 1.0]])
    cand = torch.tensor([[True, True, True, False, True], [False, True, True, True, True]])
    kept = select_top(scores, cand, torch.tensor([2, 3]))
    assert kept.tolist() == [[False, True, True, False, False], [False, True, True, True, False]]
    assert not select_top(scores, cand, torch.tensor([0, 0])).any()


def test_grid_priority_is_spatially_even() -> None:
    pr = grid_priority(24, 24)
    assert sorted(pr.tolist()) == sorted(set(pr.tolist()))  # a strict order
    top = torch.argsort(pr)[:144].reshape(-1)  # keep 25%
    rows, cols = top // 24, top % 24
    # every 4x4 block of the grid holds the same number of kept tokens
    blocks = torch.bincount((rows // 4) * 6 + cols // 4, minlength=36)
    assert blocks.min() == blocks.max() == 4


def test_sequence_priority_spreads() -> None:
    pr = sequence_priority(16)
    first4 = sorted(torch.argsort(pr)[:4].tolist())
    assert first4 == [0, 4, 8, 12]


def test_random_scores_depend_on_sample_not_batch() -> None:
    a = random_scores(10, seed=0, stage=0, row_key=b"abc")
    assert torch.equal(a, random_scores(10, seed=0, stage=0, row_key=b"abc"))
    assert not torch.equal(a, random_scores(10, seed=1, stage=0, row_key=b"abc"))
    assert not torch.equal(a, random_scores(10, seed=0, stage=0, row_key=b"abd"))


def test_unrotate_inverts_the_rotary_embedding() -> None:
    """HF's half-split rotary, also with a scaled rope (cos^2 + sin^2 != 1), is undone."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(1)
    q, k = torch.randn(2, 4, 6, 8, dtype=torch.float64), torch.randn(2, 2, 6, 8, dtype=torch.float64)
    angle = torch.rand(2, 6, 4, dtype=torch.float64) * 50
    for scale in (1.0, 1.3):
        cos, sin = (torch.cat([f(angle)] * 2, dim=-1) * scale for f in (torch.cos, torch.sin))
        q_rot, k_rot = apply_rotary_pos_emb(q, k, cos, sin)
        assert not torch.allclose(q_rot.float(), q.float())
        torch.testing.assert_close(unrotate(q_rot, cos, sin), q.float())
        torch.testing.assert_close(unrotate(k_rot, cos, sin), k.float())


def test_rotate_equals_hf_rotary_bit_for_bit() -> None:
    """The ranking's keys: HF's ``apply_rotary_pos_emb`` exactly (float32 and bfloat16, strided
    input as the projections give it, halves of (cos, sin) that differ as a multimodal rope's may)."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(2)
    for dtype in (torch.float32, torch.bfloat16):
        k = torch.randn(2, 7, 3, 16, dtype=dtype).transpose(1, 2)  # [batch, heads, n, head_dim], strided
        angle = torch.rand(2, 7, 16) * 50
        cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
        _, expected = apply_rotary_pos_emb(k[:, :1, :1], k, cos, sin)
        assert torch.equal(rotate(k, cos, sin), expected)


def test_sink_mask_threshold_is_relative_to_the_median_image_token() -> None:
    hidden = torch.ones(2, 6, 4)  # norm 2 everywhere
    hidden[0, 2] *= 25  # 25 x the median: a sink
    hidden[0, 4] *= 15  # 15 x: not one
    hidden[1, 0] *= 100  # not a candidate (text): never a sink, not in the median
    hidden[1, 3] *= 20  # exactly 20 x: a sink
    cand = torch.tensor([[False, True, True, True, True, True], [False, True, True, True, True, True]])
    assert sink_mask(hidden, cand).tolist() == [
        [False, False, True, False, False, False], [False, False, False, True, False, False]]
    assert not sink_mask(hidden, torch.zeros_like(cand)).any()


def test_sink_scores_stay_finite_so_counts_hold() -> None:
    """A dropped sink ranks below every candidate but still above the non-candidates,
    so a kept count larger than the other candidates is met exactly."""
    att = torch.tensor([[0.1, 0.3, 0.2, 0.4]])
    cand = torch.tensor([[False, True, True, True]])
    sinks = torch.tensor([[False, False, False, True]])
    dropped = sink_scores(att, sinks, keep=False)
    assert select_top(dropped, cand, torch.tensor([2])).tolist() == [[False, True, True, False]]
    assert select_top(dropped, cand, torch.tensor([3])).sum() == 3
    kept = sink_scores(att, sinks, keep=True)
    assert select_top(kept, cand, torch.tensor([1])).tolist() == [[False, False, False, True]]


def test_query_attention_without_mask_or_weights_is_the_masked_sum_bit_for_bit() -> None:
    """``visible=None`` (every key) and ``weights=None`` (rows alike): the numbers of the
    all-visible mask with equal weights, to the bit for one row (the engine's last-token query)."""
    torch.manual_seed(1)
    b, h, kvh, n, dh = 2, 4, 2, 9, 8
    q, k = torch.randn(b, h, 1, dh), torch.randn(b, kvh, n, dh)
    every = torch.ones(b, 1, n, dtype=torch.bool)
    one = torch.ones(b, 1)
    assert torch.equal(query_attention(q, k, None, None, dh**-0.5), query_attention(q, k, every, one, dh**-0.5))
    q3 = torch.randn(b, h, 3, dh)
    torch.testing.assert_close(
        query_attention(q3, k, None, None, dh**-0.5),
        query_attention(q3, k, every.expand(b, 3, n), torch.full((b, 3), 1 / 3), dh**-0.5),
    )


def test_query_attention_in_row_chunks_is_the_same(monkeypatch) -> None:
    """Many query rows (``mean``) are scored in chunks; the weighted sum does not change."""
    import redundancy.ranking as ranking

    torch.manual_seed(2)
    b, h, kvh, n, dh = 2, 4, 2, 9, 5
    q, k = torch.randn(b, h, 7, dh), torch.randn(b, kvh, n, dh)
    rows = torch.tensor([[2, 3, 4, 5, 6, 7, 8], [4, 5, 6, 7, 8, 8, 8]])
    visible = torch.arange(n)[None, None, :] <= rows[:, :, None]
    weight = torch.tensor([[1 / 7] * 7, [0.2] * 5 + [0.0, 0.0]])
    whole = query_attention(q, k, visible, weight, dh**-0.5)
    monkeypatch.setattr(ranking, "_ROW_CHUNK", 3)
    torch.testing.assert_close(query_attention(q, k, visible, weight, dh**-0.5), whole)
    monkeypatch.setattr(ranking, "_ROW_CHUNK", 1)
    torch.testing.assert_close(query_attention(q, k, visible, weight, dh**-0.5), whole)
    alike = query_attention(q, k, None, torch.full((b, 7), 1 / 7), dh**-0.5)  # no mask, rows alike, chunked
    torch.testing.assert_close(query_attention(q, k, None, None, dh**-0.5), alike)
