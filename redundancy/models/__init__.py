"""Model families the engine supports, one adapter each."""

from __future__ import annotations

from torch import nn

from redundancy.models.base import FamilyAdapter, HFModule
from redundancy.models.llava import LlavaAdapter
from redundancy.models.llava_next import LlavaNextAdapter
from redundancy.models.qwen2_vl import Qwen2VLAdapter

ADAPTERS: tuple[type[FamilyAdapter], ...] = (LlavaAdapter, LlavaNextAdapter, Qwen2VLAdapter)


def adapter_for(model: nn.Module) -> FamilyAdapter:
    """The adapter for ``model`` (a ``*ForConditionalGeneration`` of a supported family)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    known = sorted(t for cls in ADAPTERS for t in cls.model_types)
    raise ValueError(f"model_type={model_type!r} is not supported; supported families: {known}")


__all__ = ["ADAPTERS", "FamilyAdapter", "HFModule", "LlavaAdapter", "LlavaNextAdapter", "Qwen2VLAdapter", "adapter_for"]
