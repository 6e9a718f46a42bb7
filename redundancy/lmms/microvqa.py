"""Functions of the lmms-eval task ``redundancy_microvqa`` (the shipped microvqa test split).

    python -m lmms_eval --model redundancy_llava --model_args pretrained=micro-llava-vanilla,method=pdrop \\
        --tasks redundancy_microvqa --include_path redundancy/lmms/tasks --device cpu --batch_size 32

lmms-eval reads ``questions.jsonl`` with the ``json`` builder (offline, no hub); each doc is
one line of the local format (:mod:`redundancy.data`). Scoring is :func:`redundancy.data.exact_match`,
the project's own scorer; the task reports ``exact_match`` over all questions and one
accuracy per question family.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from redundancy.data import exact_match
from redundancy.loading import TEST_SET

DATA_DIR = TEST_SET  # the yaml's data_files names this directory's questions.jsonl


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(DATA_DIR / doc["image"]).convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    return doc["question"]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``exact_match`` for every question, and the same score under the question's family
    (lmms-eval averages each metric over the docs that report it)."""
    score = exact_match(results[0], doc["answers"])
    return {"exact_match": score, doc["family"]: score}
