"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

    LlavaNextForConditionalGeneration
    ├── model: LlavaNextModel             (input_ids, pixel_values, image_sizes)
    │   ├── vision_tower, multi_modal_projector, image_newline
    │   └── language_model: LlamaModel / MistralModel / Qwen2Model
    └── lm_head

Per image the packed features are: the base image (a ``g x g`` grid), then the
any-res crops stitched into one grid, unpadded to the image's aspect ratio, with
one "newline" token closing each row (``h' x (w' + 1)``). The count varies per
image, so rows of one batch hold different numbers of image tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from redundancy.models.base import FamilyAdapter
from redundancy.ranking import Grid, row_grids


def next_image_layout(
    height: int, width: int, image_size: int, patch_size: int, pinpoints: list[list[int]]
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((g, g), (h', w' + 1))``: the base grid and the unpadded high-res grid with
    its newline column, for an image of ``height x width`` pixels (same arithmetic
    as transformers' ``pack_image_features`` / ``unpad_image``)."""
    from transformers.image_processing_utils import select_best_resolution  # heavy: loaded on first use

    g = image_size // patch_size
    best_h, best_w = select_best_resolution((height, width), pinpoints)
    cur_h, cur_w = best_h // image_size * g, best_w // image_size * g
    if width / height > cur_w / cur_h:
        new_h = int(round(height * (cur_w / width), 7))
        cur_h -= ((cur_h - new_h) // 2) * 2
    else:
        new_w = int(round(width * (cur_h / height), 7))
        cur_w -= ((cur_w - new_w) // 2) * 2
    return (g, g), (cur_h, cur_w + 1)


class LlavaNextAdapter(FamilyAdapter):
    family = "llava_next"
    model_types = ("llava_next",)

    def image_grids(self, n_image: list[int], extra: dict[str, Any]) -> list[list[Grid] | None]:
        sizes = extra.get("image_sizes")
        cfg = self.model.config
        if sizes is None:
            return [None for _ in n_image]
        images = [
            list(next_image_layout(
                int(h), int(w), cfg.vision_config.image_size, cfg.vision_config.patch_size, cfg.image_grid_pinpoints
            ))
            for h, w in torch.as_tensor(sizes).tolist()
        ]
        return row_grids(n_image, images)
