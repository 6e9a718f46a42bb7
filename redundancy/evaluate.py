"""Answer questions with a model, optionally under a drop schedule.

    preds = predict(model, processor, samples, schedule=DropSchedule.drop(layer=16, ratio=0.1))
    redundancy.data.evaluate(samples, {s.question_id: p for s, p in zip(samples, preds)})

Batches are left-padded and answered by greedy ``generate``; answers are decoded
with the processor's tokenizer and scored by :mod:`redundancy.data`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm

from redundancy.data import Sample
from redundancy.engine import apply_schedule
from redundancy.prompts import prompt
from redundancy.schedule import DropSchedule


def prompts(processor: Any, samples: Sequence[Sample]) -> list[str]:
    """Each sample's prompt in ``processor``'s chat template (its family's default when it has none)."""
    return [prompt(processor, s.question) for s in samples]


def batches(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@torch.no_grad()
def greedy_answers(model: Any, processor: Any, inputs: Any, max_new_tokens: int) -> list[str]:
    """The greedy continuations of a left-padded batch, decoded and stripped."""
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [a.strip() for a in processor.tokenizer.batch_decode(new, skip_special_tokens=True)]


@torch.no_grad()
def predict(
    model: Any,
    processor: Any,
    samples: Sequence[Sample],
    *,
    schedule: DropSchedule | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 4,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to ``samples`` (in order), under ``schedule`` when given."""
    model.eval()
    answers: list[str] = []
    ctx = apply_schedule(model, schedule, trace=False) if schedule else contextlib.nullcontext()
    with ctx:
        for chunk in tqdm(list(batches(samples, batch_size)), desc="answering", disable=not progress, leave=False):
            images = [Image.open(s.image_path).convert("RGB") for s in chunk]
            inputs = processor(images=images, text=prompts(processor, chunk), return_tensors="pt", padding=True)
            inputs = inputs.to(model.device)
            answers += greedy_answers(model, processor, inputs, max_new_tokens)
    return answers
