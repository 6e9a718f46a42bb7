"""PyramidDrop in the training forward pass (docs/method.md section 6): the engine's loss
equals the loss on the reduced sequence computed by the reference, answer tokens
are never dropped, gradients reach the projector and the vision tower (and equal
the reference's), and the ranking scores carry no gradient.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from redundancy.engine import apply_schedule
from redundancy.models.factory import build_model, tiny_config
from redundancy.schedule import DropSchedule
from tests.checks import IGNORE, with_answers
from tests.reference import make_sample, reference_loss  # noqa: F401


def fresh_model(family, text):
    model = build_model(tiny_config(family, text=text), dtype=torch.float64, seed=1)
    return model.train()


def grads(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


CASES = [
    ("llava", "llama", DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5), [(0, 4)]),
    ("llava", "qwen2", DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, rank_layer="stage_last", positions="keep"),
     [(0, 3), (3, 4)]),
    ("llava_next", "mistral", DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5), [(0, 3), (2, 2)]),
    ("llava_next", "llama", DropSchedule.pdrop(layers=(1, 3), ratios=(0.5, 0.2), ranker="instruction"),
     [(0, 3), (3, 3)]),
]


@pytest.mark.parametrize("family,text,schedule,spans", CASES, ids=[f"{c[0]}-{c[1]}-{len(c[3])}ans" for c in CASES])
def test_training_loss_and_gradients_match_reference(family, text, schedule, spans):
    model = fresh_model(family, text)
    prompt, pv, sizes = make_sample(model, seed=61, before=3, after=4)
    ids, labels, answer = with_answers(model, prompt, spans, seed=62)
    L = ids.shape[1]

    # engine
    model.zero_grad()
    with apply_schedule(model, schedule) as trace:
        out = model(input_ids=ids, pixel_values=pv, image_sizes=sizes, labels=labels)
    # the same loss in float64 from the engine's logits (HF upcasts logits to float32 only)
    logits = out.logits[0]
    loss64 = F.cross_entropy(logits[:-1], labels[0, 1:], ignore_index=IGNORE)
    loss64.backward()
    engine_grads = grads(model)

    # reference: loss on the reduced sequence
    model.zero_grad()
    ref_loss, ref = reference_loss(model, ids, pv, schedule, labels, image_sizes=sizes)
    ref_loss.backward()
    ref_grads = grads(model)

    # same ranking, with the training query rows (one per answer span)
    assert [rec.kept[0].tolist() for rec in trace.boundaries] == ref.kept
    for i, rec in enumerate(trace.boundaries):
        assert not rec.scores[0].requires_grad and rec.scores[0].grad_fn is None
        torch.testing.assert_close(rec.scores[0].double(), ref.scores[i], atol=1e-6, rtol=0, equal_nan=True)
    assert tuple(trace.kept_counts()[0]) == schedule.stage_counts(ref.n_image)

    # answer tokens (and every text token) are never dropped
    image = set(i for i in range(L) if ids[0, i] == model.config.image_token_id)
    assert set(answer) <= set(ref.positions)
    assert set(range(L)) - image <= set(ref.positions)
    assert bool((logits[answer].abs().sum(-1) > 0).all())
    torch.testing.assert_close(logits[ref.positions], ref.logits, atol=1e-8, rtol=0)

    # the loss
    torch.testing.assert_close(loss64, ref_loss, atol=1e-10, rtol=0)
    torch.testing.assert_close(out.loss.double(), ref_loss.detach(), atol=1e-6, rtol=1e-6)
    assert out.loss.requires_grad

    # gradients: the projector and the vision tower are reached, and agree with the reference
    proj = [n for n in engine_grads if n.startswith("model.multi_modal_projector.")]
    vision = [n for n in engine_grads if n.startswith("model.vision_tower.")]
    assert proj and all(engine_grads[n].abs().sum() > 0 for n in proj)
    assert vision and any(engine_grads[n].abs().sum() > 0 for n in vision)
    assert set(engine_grads) == set(ref_grads)
    for name in engine_grads:
        torch.testing.assert_close(
            engine_grads[name], ref_grads[name], atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_hf_loss_backward_reaches_the_encoder():
    """The HF loss itself (what a trainer calls) back-propagates through the engine."""
    model = fresh_model("llava", "mistral")
    prompt, pv, sizes = make_sample(model, seed=71)
    ids, labels, _ = with_answers(model, prompt, [(0, 5)], seed=72)
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5)
    with apply_schedule(model, schedule) as trace:
        out = model(input_ids=ids, pixel_values=pv, labels=labels)
        out.loss.backward()
    for name, p in model.model.multi_modal_projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    tower = [p.grad for p in model.model.vision_tower.parameters() if p.grad is not None]
    assert tower and any(g.abs().sum() > 0 for g in tower)
    assert all(not s.requires_grad for rec in trace.boundaries for s in rec.scores)


def test_training_batch_right_padded():
    """Two samples of different lengths in one training batch (right padding, the
    usual training layout): the HF loss is the mean over all supervised tokens of
    both reduced sequences."""
    model = fresh_model("llava", "qwen2")
    schedule = DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5)
    rows = []
    for seed, (before, after, spans) in zip((81, 83), ((2, 3, [(0, 3)]), (5, 4, [(0, 2), (2, 4)]))):
        prompt, pv, _ = make_sample(model, seed=seed, before=before, after=after)
        ids, labels, _ = with_answers(model, prompt, spans, seed=seed + 1)
        rows.append((ids, labels, pv))
    width = max(r[0].shape[1] for r in rows)
    ids = torch.zeros(2, width, dtype=torch.long)
    labels = torch.full((2, width), IGNORE)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, (r_ids, r_labels, _) in enumerate(rows):
        n = r_ids.shape[1]
        ids[i, :n], labels[i, :n], mask[i, :n] = r_ids[0], r_labels[0], 1
    assert not bool(mask.all())
    pv = torch.cat([r[2] for r in rows])
    with apply_schedule(model, schedule) as trace:
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels)
    total, count = 0.0, 0
    for i, (r_ids, r_labels, r_pv) in enumerate(rows):
        loss, ref = reference_loss(model, r_ids, r_pv, schedule, r_labels)
        n_sup = int((r_labels[0, 1:] != IGNORE).sum())
        total, count = total + loss.detach() * n_sup, count + n_sup
        assert [rec.kept[i].tolist() for rec in trace.boundaries] == ref.kept
        torch.testing.assert_close(out.logits[i, ref.positions], ref.logits, atol=1e-8, rtol=0)
    torch.testing.assert_close(out.loss.double(), total / count, atol=1e-6, rtol=1e-6)
