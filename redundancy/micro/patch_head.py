"""The auxiliary per-patch head of the micro-LLaVA's vision pretraining (not part of the
shipped model): per-patch classifiers and regressors on the projected image features, one per
generator target (``redundancy.micro.microvqa.PATCH_TARGETS``), their labels, loss and accuracy."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from redundancy.micro.microvqa import PATCH_TARGETS, REGRESSION_TARGETS, SPARSE_TARGETS, Example, patch_targets
from redundancy.micro.model import MicroConfig


def check_targets(targets: list[str]) -> None:
    """A vision stage's targets: keys of ``PATCH_TARGETS``, colour first (it defines the object patches)."""
    if not targets or targets[0] != "color" or any(t not in PATCH_TARGETS for t in targets):
        raise ValueError(f"vision targets {targets} must start with color and be among {list(PATCH_TARGETS)}")


class PatchHead(torch.nn.Module):
    """Per-patch classifiers (one output per class) and regressors (x, y: one output) on the
    projected image features, one per target (vision pretraining only; not part of the
    shipped model)."""

    def __init__(
        self, hidden: int, targets: list[str], sparse_weight: float = 0.0, position_weight: float = 1.0
    ) -> None:
        super().__init__()
        check_targets(targets)
        self.targets = list(targets)
        self.sparse_weight = sparse_weight  # see Stage.sparse_weight
        self.position_weight = position_weight  # see Stage.position_weight
        self.sizes = [PATCH_TARGETS[t] for t in targets]
        self.proj = torch.nn.Linear(hidden, sum(self.sizes))

    def forward(self, model: Any, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        feats = model.model.get_image_features(pixel_values=pixel_values).pooler_output
        return self.read(torch.stack(list(feats)))

    def read(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """Per-target logits of projected image features [batch, patches, hidden]."""
        return list(torch.split(self.proj(feats), self.sizes, dim=-1))  # [batch, patches, classes]


@contextlib.contextmanager
def projected_features(model: Any) -> Iterator[list[torch.Tensor]]:
    """Collects the multimodal projector's outputs (the image features the language model
    reads) of the forward passes run inside the block."""
    seen: list[torch.Tensor] = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        yield seen
    finally:
        handle.remove()


def patch_labels(examples: list[Example], shape: MicroConfig, targets: list[str]) -> torch.Tensor:
    """The per-patch labels of ``targets`` for each example's image: [batch, len(targets), patches]."""
    rows = [list(PATCH_TARGETS).index(t) for t in targets]
    return torch.from_numpy(np.stack([patch_targets(e.objects, shape.image_size, shape.patch)[rows] for e in examples]))


def vision_batch(
    processor: Any, examples: list[Example], shape: MicroConfig, targets: list[str]
) -> dict[str, torch.Tensor]:
    pixels = processor.image_processor([e.image for e in examples], return_tensors="pt")["pixel_values"]
    return {"pixel_values": pixels, "targets": patch_labels(examples, shape, targets)}


def _position(labels: torch.Tensor, side: int) -> torch.Tensor:
    """A regression target's labels (1 + px, see ``patch_targets``) in units of the image side."""
    return (labels - 1) / side


def vision_loss(model: Any, head: PatchHead, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vision stage's loss (see ``patch_loss``) on the model's projected image features."""
    return patch_loss(head, head(model, batch["pixel_values"]), batch["targets"], batch["pixel_values"].shape[-1])


def patch_loss(head: PatchHead, logits: list[torch.Tensor], targets: torch.Tensor, side: int) -> torch.Tensor:
    """Colour (with background) over every patch; every other target over object patches
    only, so the few informative patches are not drowned by the background; with the
    head's ``sparse_weight``, the sparse targets (glyph, center) once more over the patches that
    carry them, so "none" does not drown them among the object patches either; the
    regression targets (x, y) as ``position_weight`` x the squared error over object patches,
    in units of the image side (``side`` px)."""
    # targets: [batch, targets, patches]
    fg = targets[:, 0] > 0
    ce = torch.nn.functional.cross_entropy
    loss = ce(logits[0].flatten(0, 1), targets[:, 0].flatten())
    for i, (name, lg) in enumerate(zip(head.targets[1:], logits[1:]), start=1):
        if name in REGRESSION_TARGETS:
            loss = loss + head.position_weight * torch.nn.functional.mse_loss(
                lg[fg][:, 0], _position(targets[:, i][fg], side)
            )
            continue
        loss = loss + ce(lg[fg], targets[:, i][fg])
        on = targets[:, i] > 0
        if head.sparse_weight and name in SPARSE_TARGETS and on.any():
            loss = loss + head.sparse_weight * ce(lg[on], targets[:, i][on])
    return loss


@torch.no_grad()
def patch_accuracy(model: Any, head: PatchHead, batch: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-target accuracy on object patches; glyph on glyph patches; center as the mean of
    its recall on centre patches and on the other object patches (balanced); for x and y
    the mean absolute error in px (``x_err_px``)."""
    logits = head(model, batch["pixel_values"])
    targets = batch["targets"]
    fg = targets[:, 0] > 0

    def acc(i: int, where: torch.Tensor) -> float:
        return float(((logits[i].argmax(-1) == targets[:, i]) & where).sum() / where.sum().clamp(min=1))

    out = {}
    for i, name in enumerate(head.targets):
        if name == "glyph":
            out[name] = acc(i, targets[:, i] > 0)
        elif name in REGRESSION_TARGETS:
            side = batch["pixel_values"].shape[-1]
            err = (logits[i][..., 0] - _position(targets[:, i], side)).abs() * side
            out[f"{name}_err_px"] = float(err[fg].mean())
        elif name == "center":
            out[name] = 0.5 * (acc(i, targets[:, i] > 0) + acc(i, fg & (targets[:, i] == 0)))
        else:
            out[name] = acc(i, fg)
    return out
