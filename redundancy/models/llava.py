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
from redundancy.ranking import cls_attention, grid_priority, sequence_priority


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    model_types = ("llava",)

    def cls_layer(self) -> int:
        """The CLIP layer right after the one whose output LLaVA feeds the LLM
        (``vision_feature_layer``): for LLaVA-1.5 the tower's last layer, its input the
        second-to-last layer's output, which HF keeps (FasterVLM's [CLS] attention). Needs
        the ``default`` feature selection (the [CLS] token is not an image token), one
        feature layer, and a layer after it."""
        cfg = self.model.config
        feature = cfg.vision_feature_layer
        n = len(self._vision_layers)
        if cfg.vision_feature_select_strategy != "default" or not isinstance(feature, int) or feature % (n + 1) >= n:
            raise ValueError(
                "ranker='vision_cls' needs vision_feature_select_strategy='default' and one vision_feature_layer "
                "before the vision tower's last layer"
            )
        return feature % (n + 1)  # hidden_states[j] (the features) is the input of layer j

    @property
    def _vision_layers(self) -> Any:
        tower = self.multimodal.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # older transformers nest the encoder

    def cls_scores(self, outputs: Any) -> torch.Tensor:
        index = self.cls_layer()
        if outputs.hidden_states is None:
            raise ValueError("ranker='vision_cls' needs the vision tower's hidden states")
        layer = self._vision_layers[index]
        attn = layer.self_attn
        with torch.no_grad():
            features = outputs.hidden_states[self.model.config.vision_feature_layer]  # the layer's input
            x = layer.layer_norm1(features)  # [n_images, tokens, d_v]
            n, t, _ = x.shape
            q = attn.q_proj(x[:, :1]).view(n, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(n, t, -1, attn.head_dim).transpose(1, 2)
        return cls_attention(q, k, float(attn.scale))

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
