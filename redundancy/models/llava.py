"""LLaVA-1.5 (``LlavaForConditionalGeneration``).

    LlavaForConditionalGeneration
    ├── model: LlavaModel                 (input_ids, pixel_values -> inputs_embeds)
    │   ├── vision_tower: CLIPVisionModel
    │   ├── multi_modal_projector
    │   └── language_model: LlamaModel / MistralModel / Qwen2Model
    └── lm_head

Each image becomes ``(image_size / patch_size) ** 2`` consecutive image tokens in
raster order (576 = 24 x 24 for the 336 px CLIP ViT-L/14 of LLaVA-1.5).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from redundancy.models.base import FamilyAdapter
from redundancy.ranking import grid_priority, sequence_priority


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    model_types = ("llava",)

    def image_priorities(self, n_image: list[int], extra: dict[str, Any]) -> list[torch.Tensor]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        per_image = side * side
        out = []
        for n in n_image:
            if n > 0 and n % per_image == 0:
                out.append(torch.cat([grid_priority(side, side) for _ in range(n // per_image)]))
            elif math.isqrt(n) ** 2 == n:
                out.append(grid_priority(math.isqrt(n), math.isqrt(n)))
            else:
                out.append(sequence_priority(n))
        return out
