"""Shared checks of the engine against the slow reference (tests/reference.py) and the
inputs they take: tolerances, an engine prefill, one row compared, prompts with answers."""

from __future__ import annotations

import torch

from redundancy.engine import apply_schedule
from tests.reference import make_sample, reference_run, tiny_model

ATOL = {"sdpa": 1e-8, "eager": 1e-6}
# The tiny models have 4 query heads over 2 key heads (GQA) unless a test says otherwise.
SCORE_ATOL = 1e-6  # the engine scores in float32 (docs/method.md section 3)


def run_engine(model, ids, pv, sizes, schedule, **kw):
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        out = model(input_ids=ids, pixel_values=pv, image_sizes=sizes, **kw)
    return out.logits, trace


def check_row(logits, trace, row, ref, schedule, atol, pad=0):
    """Row ``row`` of an engine prefill (left-padded by ``pad``) against one reference sample."""
    assert trace.n_image[row] == ref.n_image
    assert tuple(trace.kept_counts()[row]) == schedule.stage_counts(ref.n_image)
    assert len(trace.boundaries) == len(schedule.boundaries)
    for i, rec in enumerate(trace.boundaries):
        assert rec.layer == schedule.boundaries[i]
        assert rec.kept[row].tolist() == ref.kept[i], f"boundary {rec.layer}: kept image tokens differ"
        assert not rec.scores[row].requires_grad
        torch.testing.assert_close(rec.scores[row].double(), ref.scores[i], atol=SCORE_ATOL, rtol=0, equal_nan=True)
    own = logits[row, pad:]
    assert own.shape[0] == ref.length
    torch.testing.assert_close(own[ref.positions], ref.logits, atol=atol, rtol=0)
    torch.testing.assert_close(own[-1], ref.logits[-1], atol=atol, rtol=0)
    dropped = sorted(set(range(ref.length)) - set(ref.positions))
    assert len(dropped) == ref.n_image - (len(ref.kept[-1]) if ref.kept else ref.n_image)
    assert bool((own[dropped] == 0).all()), "dropped positions must hold zeros (hidden states scattered back)"


def compare(family, text, impl, schedule, dtype=torch.float64, atol=None, kv_heads=2, **sample):
    model = tiny_model(family, text, impl, dtype, kv_heads=kv_heads)
    ids, pv, sizes = make_sample(model, **sample)
    with torch.no_grad():
        ref = reference_run(model, ids, pv, schedule, image_sizes=sizes)
    logits, trace = run_engine(model, ids, pv, sizes, schedule)
    check_row(logits, trace, 0, ref, schedule, ATOL[impl] if atol is None else atol)
    return ref


IGNORE = -100


def with_answers(model, ids, spans, seed):
    """Append answer spans to a prompt: ``spans`` is a list of ``(question_len, answer_len)``;
    the first question is the prompt's own text, later ones are added before their answer.
    Returns ``(input_ids [1, L], labels [1, L], answer positions)``."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.text_config.vocab_size
    tokens = ids[0].tolist()
    labels = [IGNORE] * len(tokens)
    answer = []
    for i, (q, a) in enumerate(spans):
        if i > 0:
            new = torch.randint(3, vocab - 1, (q,), generator=gen).tolist()
            tokens += new
            labels += [IGNORE] * q
        new = torch.randint(3, vocab - 1, (a,), generator=gen).tolist()
        answer += range(len(tokens), len(tokens) + a)
        tokens += new
        labels += new
    return torch.tensor([tokens]), torch.tensor([labels]), answer
