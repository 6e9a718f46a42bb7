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

from redundancy.models.base import FamilyAdapter, HFModule
from redundancy.ranking import Grid, cls_attention


class LlavaAdapter(FamilyAdapter):
    family = "llava"
    model_types = ("llava",)

    def cls_layer(self) -> HFModule:
        """The CLIP layer whose output LLaVA feeds the LLM (``vision_feature_layer``: the
        tower's last layer for the micro models, the second-to-last for LLaVA-1.5). Needs the
        ``default`` feature selection (the [CLS] token is not an image token) and one feature layer."""
        cfg = self.model.config
        feature = cfg.vision_feature_layer
        layers = self._vision_layers
        one_layer = isinstance(feature, int) and feature % (len(layers) + 1) > 0
        if cfg.vision_feature_select_strategy != "default" or not one_layer:
            raise ValueError(
                "ranker='vision_cls' needs vision_feature_select_strategy='default' and one vision_feature_layer "
                "that is a layer's output"
            )
        return layers[feature % (len(layers) + 1) - 1]  # hidden_states[j] is the output of layer j - 1

    @property
    def _vision_layers(self) -> HFModule:
        tower = self.multimodal.vision_tower
        return getattr(tower, "vision_model", tower).encoder.layers  # older transformers nest the encoder

    def cls_layer_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The input of :meth:`cls_layer` for ``pixel_values``, the vision tower run again (for
        images whose features were encoded before, without the engine: the grid runner's)."""
        feature = self.model.config.vision_feature_layer % (len(self._vision_layers) + 1)
        with torch.no_grad():
            out = self.multimodal.vision_tower(pixel_values, output_hidden_states=True)
        return out.hidden_states[feature - 1]

    def cls_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        layer = self.cls_layer()
        attn = layer.self_attn
        with torch.no_grad():
            x = layer.layer_norm1(hidden)  # [n_images, tokens, d_v]
            n, t, _ = x.shape
            q = attn.q_proj(x[:, :1]).view(n, 1, -1, attn.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(n, t, -1, attn.head_dim).transpose(1, 2)
        return cls_attention(q, k, float(attn.scale))

    def image_grids(self, n_image: list[int], extra: dict[str, Any]) -> list[list[Grid] | None]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        out: list[list[Grid] | None] = []
        for n in n_image:
            if n > 0 and n % (side * side) == 0:
                out.append([(side, side)] * (n // (side * side)))
            elif math.isqrt(n) ** 2 == n:
                out.append([(math.isqrt(n), math.isqrt(n))])
            else:
                out.append(None)
        return out
