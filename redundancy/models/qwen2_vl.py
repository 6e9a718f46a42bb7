"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

    Qwen2VLForConditionalGeneration
    ├── model: Qwen2VLModel               (input_ids, pixel_values, image_grid_thw, mm_token_type_ids)
    │   ├── visual                        ViT with a 2x2 patch merger (window attention in 2.5)
    │   └── language_model: Qwen2VLTextModel   Qwen2 decoder: GQA, q/k/v biases
    │       ├── layers[0..L-1], norm
    │       └── rotary_emb                multimodal rotary (M-RoPE), position_ids [3, batch, n]
    └── lm_head

An image of ``(t, h, w)`` patches (``image_grid_thw``) becomes ``t * (h/2) * (w/2)``
consecutive image tokens between ``<|vision_start|>`` and ``<|vision_end|>``, in
raster order of the merged grid (frame, row, column); the count varies per image.

Positions (``Qwen2VLModel.get_rope_index``) have three components (temporal,
height, width). A text token at sequence position ``p`` holds ``(p, p, p)``; the
merged-grid cell ``(f, i, j)`` of an image that starts at ``p`` holds
``(p + f, p + i, p + j)``, and the text after the image resumes at
``p + max(h/2, w/2)``. The language model receives them as ``[3, batch, n]``
(forward) or ``[4, batch, n]`` (``generate`` prepends a plain 1-D text row, read
only by flash-attention's packed-sequence detection); decoded tokens continue
from the last prompt position (``rope_deltas``). The positions under the
``keep`` and ``compact`` policies are defined in docs/method.md section 4.
"""

from __future__ import annotations

from typing import Any

import torch

from redundancy.models.base import FamilyAdapter, PositionEmbeddings
from redundancy.ranking import Grid, row_grids

_MROPE = 3  # temporal, height, width


def compact_mrope(kept: torch.Tensor, valid: torch.Tensor, is_image: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """Renumber multimodal positions after a drop (``compact``, docs/method.md section 4).

    The row is cut into runs: each text token alone, each image (a run of consecutive
    image tokens) as one. Each run is moved rigidly, per component, so that its
    smallest kept position becomes the running position; the running position then
    advances by the run's extent ``max over components of (max - min + 1)``. Text is
    numbered contiguously; an image becomes the bounding box of its kept tokens,
    numbered as ``get_rope_index`` numbers a grid of that size. Nothing dropped:
    unchanged. Video tokens are not image tokens: they would be renumbered as text.

    Args:
        kept: ``[3, batch, m]`` positions of the kept tokens (rows left-padded).
        valid: ``[batch, m]`` bool, real tokens.
        is_image: ``[batch, m]`` bool, image tokens among them.
        start: ``[batch, 1]`` the running position of the first token.

    Returns:
        ``[3, batch, m]`` long positions (0 at padding).
    """
    c, b, m = kept.shape
    prev_image = torch.cat([torch.zeros_like(is_image[:, :1]), is_image[:, :-1]], dim=1)
    prev_valid = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], dim=1)
    opens = valid & (~prev_valid | ~is_image | ~prev_image)  # every text token, the first token of an image
    run = torch.where(valid, opens.long().cumsum(1) - 1, m)  # [batch, m]; padding -> spare run m
    big = torch.iinfo(torch.long).max
    idx = run[None].expand(c, -1, -1)
    lo = torch.full((c, b, m + 1), big, dtype=torch.long, device=kept.device)
    lo = lo.scatter_reduce(2, idx, kept.long(), "amin")  # [3, batch, run]
    hi = torch.full((c, b, m + 1), -1, dtype=torch.long, device=kept.device)
    hi = hi.scatter_reduce(2, idx, kept.long(), "amax")
    extent = torch.where(hi[0] >= 0, (hi - lo + 1).amax(0), 0)  # [batch, run]; unused runs: 0
    offset = start + extent.cumsum(1) - extent  # running position at each run's first token
    new = kept.long() - lo.gather(2, idx) + offset.gather(1, run)[None]
    return torch.where(valid[None], new, 0)


class Qwen2VLAdapter(FamilyAdapter):
    family = "qwen2_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl")
    layout_inputs = ("image_grid_thw",)

    # -------------------------------------------------------------- positions
    def positions(
        self, position_ids: torch.Tensor | None, batch: int, length: int, start: int, device: torch.device
    ) -> torch.Tensor:
        if position_ids is None:  # text only: the sequence position in every component (as HF does)
            position_ids = torch.arange(start, start + length, device=device)[None]
        if position_ids.dim() == 3 and position_ids.shape[0] == _MROPE + 1:
            position_ids = position_ids[1:]  # drop generate's 1-D text row
        if position_ids.dim() == 2:
            position_ids = position_ids[None]
        return position_ids.expand(_MROPE, batch, length)

    def packing_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        # Only the 1-D text row of the 4-row form marks packed sequences (Qwen2VLTextModel.forward).
        if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == _MROPE + 1:
            return position_ids[0]
        return None

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> PositionEmbeddings:
        return self.language_model.rotary_emb(hidden, positions)

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor | None:
        # As in HF's unpacked path: the 3-D positions are not sequence positions, and
        # flash-attention must not read gaps in them as packed sequences.
        return None

    def compact_positions(
        self, kept: torch.Tensor, valid: torch.Tensor, is_image: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        return compact_mrope(kept, valid, is_image, start)

    # ------------------------------------------------- uniform and pool controls
    def image_grids(self, n_image: list[int], extra: dict[str, Any]) -> list[list[Grid] | None]:
        grid_thw = extra.get("image_grid_thw")
        if grid_thw is None:
            return [None for _ in n_image]
        merge = int(self.model.config.vision_config.spatial_merge_size)
        # Every frame of an image is a grid of its own (subsampled and pooled alike).
        return row_grids(n_image, [[(h // merge, w // merge)] * t for t, h, w in torch.as_tensor(grid_thw).tolist()])
