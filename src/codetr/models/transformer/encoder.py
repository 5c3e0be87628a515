"""Deformable-DETR encoder: post-norm layers of multi-scale deformable self-attention + FFN
(docs/architecture.md#encoder-reference-points-3.3)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.models.transformer.layers import FFN
from codetr.models.transformer.ms_deform_attn import LevelLayout, MultiScaleDeformableAttention


class DeformableEncoderLayer(nn.Module):
    def __init__(
        self,
        embed_dims: int,
        num_heads: int,
        num_levels: int,
        num_points: int,
        ffn_dims: int,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.self_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points, attention_impl)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims)
        self.norm2 = nn.LayerNorm(embed_dims)

    def forward(
        self, x: Tensor, pos: Tensor, reference_points: Tensor, layout: LevelLayout, padding_mask: Tensor | None
    ) -> Tensor:
        """``x``, ``pos``: ``(B, N, C)``; ``reference_points``: ``(B, N, L, 2)``; ``padding_mask``: ``(B, N)``."""
        x = self.norm1(x + self.self_attn(x + pos, reference_points, x, layout, padding_mask))
        return self.norm2(x + self.ffn(x))


def encoder_reference_points(layout: LevelLayout, valid_ratios: Tensor) -> Tensor:
    """Pixel centres of every level, normalised by the valid size, times every level's valid ratio.

    ``valid_ratios``: ``(B, L, 2)`` as (w_ratio, h_ratio) -> ``(B, N, L, 2)`` normalised (x, y).
    """
    device = valid_ratios.device
    points = []
    for level, (h, w) in enumerate(layout.shapes):
        ref_y, ref_x = torch.meshgrid(
            # = linspace(0.5, h - 0.5, h) bitwise (steps of exactly 1); arange keeps traced sizes symbolic
            torch.arange(h, dtype=torch.float32, device=device) + 0.5,
            torch.arange(w, dtype=torch.float32, device=device) + 0.5,
            indexing="ij",
        )
        ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
        ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
        points.append(torch.stack((ref_x, ref_y), -1))
    return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]


class DeformableEncoder(nn.Module):
    """Stack of encoder layers; the first ``checkpoint_layers`` use activation checkpointing while training
    (``torch.utils.checkpoint``, non-reentrant: numerically identical, less memory)."""

    def __init__(
        self,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 5,
        num_points: int = 4,
        ffn_dims: int = 2048,
        checkpoint_layers: int = 0,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.layers = nn.ModuleList(
            DeformableEncoderLayer(embed_dims, num_heads, num_levels, num_points, ffn_dims, attention_impl)
            for _ in range(num_layers)
        )
        self.checkpoint_layers = checkpoint_layers

    def forward(
        self, x: Tensor, pos: Tensor, layout: LevelLayout, valid_ratios: Tensor, padding_mask: Tensor | None
    ) -> Tensor:
        """``x``: flattened features ``(B, N, C)`` -> memory ``(B, N, C)``."""
        reference_points = encoder_reference_points(layout, valid_ratios)
        for index, layer in enumerate(self.layers):
            if self.training and index < self.checkpoint_layers and torch.is_grad_enabled():
                x = checkpoint(layer, x, pos, reference_points, layout, padding_mask, use_reentrant=False)
            else:
                x = layer(x, pos, reference_points, layout, padding_mask)
        return x
