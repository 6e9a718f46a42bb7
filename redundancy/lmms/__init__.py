"""lmms-eval plugin: any lmms-eval task, answered under vanilla / drop / FastV / PyramidDrop.

    pip install -e ".[lmms]"
    python -m lmms_eval --model redundancy_llava \\
        --model_args pretrained=path/to/llava-1.5-7b-hf,method=pdrop,lam=0.5 --tasks textvqa_val
    # the shipped benchmark, offline (the task lives in this package, not in lmms-eval)
    python -m lmms_eval --model redundancy_llava --model_args pretrained=micro-llava-vanilla,method=fastv,K=2,R=0.5 \\
        --tasks redundancy_microvqa --include_path redundancy/lmms/tasks --device cpu --batch_size 32

``pyproject.toml`` registers :func:`manifest` in lmms-eval's entry-point group
``lmms_eval.models``, so ``--model redundancy_llava`` resolves to
:class:`redundancy.lmms.model.RedundancyLlava` once the package is installed. The
model arguments are described there; the task is ``tasks/redundancy_microvqa.yaml`` with its
functions in :mod:`redundancy.lmms.microvqa`.

Importing this package does not import lmms-eval (:mod:`redundancy.lmms.model` does).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MODEL_NAME = "redundancy_llava"
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry-point payload (an ``lmms_eval`` ``ModelManifest``)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="redundancy.lmms.model.RedundancyLlava")
