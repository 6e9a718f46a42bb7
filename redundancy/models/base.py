"""What the engine needs to know about a model family, in one small class.

An adapter maps canonical names to the HF modules of one family::

    <ForConditionalGeneration>           the model the user calls (labels arrive here)
    └── multimodal                       the module that sees ``input_ids`` (image tokens)
        ├── vision tower, projector      untouched by the engine
        └── language_model               decoder-only LM
            ├── layers[0..L-1]           decoder layers (``self_attn.q_proj/k_proj``, ``input_layernorm``)
            ├── norm                     final norm
            └── rotary_emb               position ids -> (cos, sin)

Position ids travel through the engine as ``[components, batch, n]``: one component
(the sequence position) for Llama-style rotary, three for Qwen2-VL's multimodal
rotary. Component 0 is the sequence axis: text tokens hold the same value in every
component. Adding a family means one more subclass registered in
:mod:`redundancy.models`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from redundancy.ranking import Grid, grid_cells, grid_priorities, rotate

PositionEmbeddings = tuple[torch.Tensor, torch.Tensor]
HFModule = Any
"""An HF module of a supported family: its sub-modules and config fields are family-specific, and
torch's stubs type every ``nn.Module`` attribute as ``Tensor | Module``, so the adapters read them untyped."""


class RankingProjections(NamedTuple):
    """What :meth:`FamilyAdapter.ranking_qk` computes with layer ``K``'s own modules."""

    query: torch.Tensor
    """``[batch, heads, n_query, head_dim]`` queries of the ranking rows, after rotary."""
    key: torch.Tensor
    """``[batch, kv_heads, n, head_dim]`` keys of every token, after rotary."""
    scaling: float
    """The softmax scaling."""
    normed: torch.Tensor
    """``[batch, n, d]`` the layer's input norm of every token."""
    key_proj: torch.Tensor
    """``[batch, n, kv_heads * head_dim]`` the key projection of every token (before any norm or rotary)."""


class FamilyAdapter:
    """Llama-style decoder behind a LLaVA-style multimodal wrapper."""

    family: ClassVar[str] = "base"
    model_types: ClassVar[tuple[str, ...]] = ()
    layout_inputs: ClassVar[tuple[str, ...]] = ("image_sizes",)
    """Keyword inputs of the multimodal module that describe the image layout (read by
    :meth:`image_grids`)."""

    def __init__(self, model: nn.Module) -> None:
        self.model: HFModule = model

    # ------------------------------------------------------------ module paths
    @property
    def multimodal(self) -> HFModule:
        return self.model.model

    @property
    def language_model(self) -> HFModule:
        return self.multimodal.language_model

    @property
    def layers(self) -> HFModule:
        return self.language_model.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def text_config(self) -> Any:
        return self.language_model.config

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def attention_configs(self) -> list[Any]:
        """The distinct config objects the attention modules read their implementation from."""
        seen: dict[int, Any] = {}
        for layer in self.layers:
            cfg = layer.self_attn.config
            seen[id(cfg)] = cfg
        return list(seen.values())

    # -------------------------------------------------------------- positions
    def positions(
        self, position_ids: torch.Tensor | None, batch: int, length: int, start: int, device: torch.device
    ) -> torch.Tensor:
        """Position ids ``[components, batch, length]`` of ``length`` tokens from what the
        multimodal module handed the language model (``None``: ``start, start + 1, ...``)."""
        if position_ids is None:
            position_ids = torch.arange(start, start + length, device=device)[None]
        return position_ids.expand(batch, length)[None]

    def packing_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The sequence positions ``[batch or 1, n]`` in which HF looks for packed sequences
        (restarts), or ``None`` where it does not look."""
        return position_ids if position_ids is not None and position_ids.dim() == 2 else None

    def rotary(self, hidden: torch.Tensor, positions: torch.Tensor) -> PositionEmbeddings:
        """``(cos, sin)`` ``[batch, n, head_dim]`` for ``positions`` ``[components, batch, n]``."""
        return self.language_model.rotary_emb(hidden, position_ids=positions[0])

    def layer_position_ids(self, positions: torch.Tensor) -> torch.Tensor | None:
        """The ``position_ids`` the decoder layers receive (flash-attention reads them)."""
        return positions[0]

    def compact_positions(
        self, kept: torch.Tensor, valid: torch.Tensor, is_image: torch.Tensor, start: torch.Tensor
    ) -> torch.Tensor:
        """``compact`` policy (docs/method.md section 4): the kept tokens ``[batch, m]``
        (``kept`` ``[components, batch, m]`` their positions before renumbering, ``is_image``
        the image tokens among them) renumbered ``start, start + 1, ...`` (``start``
        ``[batch, 1]``, the stage's first position); padding slots get 0."""
        rank = valid.long().cumsum(1) - 1
        return torch.where(valid, start + rank, 0)[None].expand_as(kept)

    def gather_position_embeddings(self, emb: PositionEmbeddings, index: torch.Tensor | None) -> PositionEmbeddings:
        """Select rows ``index`` ``[batch, k]`` of the per-token ``(cos, sin)`` (``None``: the last row)."""
        cos, sin = emb
        if index is None:
            return cos[..., -1:, :], sin[..., -1:, :]
        idx = index[..., None].expand(*index.shape, cos.shape[-1])
        return cos.gather(-2, idx), sin.gather(-2, idx)

    # ---------------------------------------------------- next-layer ranking
    def ranking_qk(
        self,
        layer_idx: int,
        hidden: torch.Tensor,
        position_embeddings: PositionEmbeddings,
        query_index: torch.Tensor | None,
    ) -> RankingProjections:
        """Queries of the rows ``query_index`` (``None``: the last row) and keys of every token, made with
        layer ``layer_idx``'s input norm and q/k projections (official PyramidDrop
        ranking), and the norm's and key projection's outputs that layer can reuse."""
        layer = self.layers[layer_idx]
        attn = layer.self_attn
        with torch.no_grad():
            normed = layer.input_layernorm(hidden)  # [batch, n, d]
            if query_index is None:
                rows = normed[:, -1:]
            else:
                rows = normed.gather(1, query_index[..., None].expand(*query_index.shape, normed.shape[-1]))
            key_proj = attn.k_proj(normed)  # [batch, n, kv_heads * head_dim]
            q = attn.q_proj(rows).view(*rows.shape[:-1], -1, attn.head_dim).transpose(1, 2)
            k = key_proj.view(*normed.shape[:-1], -1, attn.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3-style q/k norms
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = rotate(q, *self.gather_position_embeddings(position_embeddings, query_index))
            k = rotate(k, *position_embeddings)
        return RankingProjections(q, k, float(attn.scaling), normed, key_proj)

    @staticmethod
    def eager_attention(attn: nn.Module) -> Callable[..., Any]:
        module = sys.modules[type(attn).__module__]
        if hasattr(module, "eager_attention_forward"):
            return module.eager_attention_forward
        from transformers.models.llama.modeling_llama import eager_attention_forward

        return eager_attention_forward

    # ------------------------------------------------------ vision_cls score
    def cls_layer(self) -> HFModule:
        """The vision-tower layer whose [CLS] attention ranks for ``vision_cls``; families
        without a [CLS] token whose patches map one to one onto image tokens raise."""
        raise ValueError(
            f"ranker='vision_cls' needs a vision tower with a [CLS] token whose patches are the image tokens "
            f"(LLaVA-1.5); the {self.family} family has none"
        )

    def cls_layer_input(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The input ``[n_images, tokens, d_v]`` of :meth:`cls_layer` for ``pixel_values``."""
        raise NotImplementedError

    def cls_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n_images, patches]`` [CLS]-to-patch attention of :meth:`cls_layer` for its input ``hidden``."""
        raise NotImplementedError

    # ------------------------------------------------- uniform and pool controls
    def image_grids(self, n_image: list[int], extra: dict[str, Any]) -> list[list[Grid] | None]:
        """Per row, the token grids (an image, a crop, a frame: ``(height, width)`` in raster
        order) its image tokens form, in order; ``None`` where unknown. Families override this."""
        return [None for _ in n_image]

    def image_priorities(self, n_image: list[int], extra: dict[str, Any]) -> list[torch.Tensor]:
        """Per row, a priority per original image token (lower = kept first by the
        ``uniform`` control): each grid of :meth:`image_grids` subsampled evenly."""
        return [grid_priorities(g, n) for g, n in zip(self.image_grids(n_image, extra), n_image)]

    def image_cells(self, n_image: list[int], extra: dict[str, Any]) -> list[torch.Tensor]:
        """Per row, ``[n, 3]`` ``(grid, row, column)`` of each original image token (the ``pool``
        control's windows); a grid unknown is one row of ``n`` tokens."""
        return [grid_cells(g, n) for g, n in zip(self.image_grids(n_image, extra), n_image)]
