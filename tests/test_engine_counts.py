"""Kept counts follow floor(r * N) in every stage; only image tokens are dropped (issue test 5)."""

from __future__ import annotations

import math

import pytest
import torch

from redundancy.engine import apply_schedule
from redundancy.schedule import DropSchedule
from tests.helpers import make_batch, tiny_model


@pytest.mark.parametrize(
    "schedule",
    [
        DropSchedule.drop(layer=2, ratio=0.0),
        DropSchedule.drop(layer=1, ratio=0.1),
        DropSchedule.fastv(K=2, R=0.5),
        DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5),
        DropSchedule.pdrop(layers=(1, 2, 3), ratios=(0.7, 0.3, 0.0)),
        DropSchedule.pdrop(layers=(2,), lam=0.6, ranker="random"),
        DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="uniform"),
        DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="random"),
        DropSchedule.pdrop(layers=(1, 2, 3), lam=0.5, ranker="instruction", rank_layer="stage_last"),
    ],
    ids=lambda s: f"{s.method}-{s.ratios}-{s.ranker}",
)
@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_counts_and_only_image_tokens_dropped(family: str, schedule: DropSchedule) -> None:
    model = tiny_model(family, "llama", "sdpa")
    sizes = [(28, 56), (56, 56)] if family == "llava_next" else None
    batch = make_batch(model, [(3, 6), (1, 4)], image_hw=sizes)
    labels = batch["input_ids"].clone()
    labels[:, :-3] = -100  # the last 3 tokens are the answer
    with torch.no_grad(), apply_schedule(model, schedule) as trace:
        logits = model(**batch, labels=labels).logits
    is_img = batch["input_ids"] == model.config.image_token_id
    for row, n in enumerate(trace.n_image):
        assert n == int(is_img[row].sum())
        expected = [n] + [math.floor(r * n + 1e-9) for r in schedule.ratios]
        assert list(trace.kept_counts()[row]) == expected
        for s, record in enumerate(trace.boundaries):
            assert len(record.kept[row]) == expected[s + 1]
            if s > 0:  # later stages choose among the survivors of earlier ones
                assert set(record.kept[row].tolist()) <= set(trace.boundaries[s - 1].kept[row].tolist())
        # Dropped positions come back as exact zeros; every other position is computed.
        dropped = torch.zeros_like(is_img[row])
        img_pos = torch.nonzero(is_img[row]).flatten()
        final_kept = trace.boundaries[-1].kept[row]
        keep_img = torch.zeros(n, dtype=torch.bool)
        keep_img[final_kept] = True
        dropped[img_pos[~keep_img]] = True
        zero = (logits[row] == 0).all(-1)
        valid = batch["attention_mask"][row].bool()
        assert torch.equal(zero[valid], dropped[valid])


def test_answer_tokens_survive_training_drop() -> None:
    model = tiny_model("llava", "llama", "sdpa")
    batch = make_batch(model, [(2, 5)])
    labels = batch["input_ids"].clone()
    labels[:, :-2] = -100
    with torch.no_grad(), apply_schedule(model, DropSchedule.pdrop(layers=(1, 2, 3), ratios=(0.0, 0.0, 0.0))):
        logits = model(**batch, labels=labels).logits
    answer = labels[0] != -100
    assert not (logits[0, answer] == 0).all(-1).any()
