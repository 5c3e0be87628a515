"""Deformable-DETR decoders: self-attention, deformable cross-attention, FFN (post-norm) with iterative box
refinement and "look forward twice" (docs/architecture.md#decoder).

:class:`DeformableDecoder` (Co-Deformable-DETR) keeps the query position it is given for every layer and returns
the raw layer outputs; :class:`DinoDecoder` (Co-DINO) recomputes the position from each layer's input box
(``ref_point_head``) and normalises the outputs with a shared LayerNorm. Both use the same layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from codetr.models.box_ops import inverse_sigmoid
from codetr.models.transformer.layers import FFN
from codetr.models.transformer.ms_deform_attn import LevelLayout, MultiScaleDeformableAttention
from codetr.models.transformer.position import box_sine_embedding


class DinoDecoderLayer(nn.Module):
    """One decoder layer (the same in DINO and Deformable-DETR; the name is kept for FSDP wrap lists)."""

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
        self.self_attn = nn.MultiheadAttention(embed_dims, num_heads, dropout=0.0, batch_first=True)
        self.norm1 = nn.LayerNorm(embed_dims)
        self.cross_attn = MultiScaleDeformableAttention(embed_dims, num_heads, num_levels, num_points, attention_impl)
        self.norm2 = nn.LayerNorm(embed_dims)
        self.ffn = FFN(embed_dims, ffn_dims)
        self.norm3 = nn.LayerNorm(embed_dims)

    def forward(
        self,
        tgt: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        layout: LevelLayout,
        memory_padding_mask: Tensor | None,
        self_attn_mask: Tensor | None,
    ) -> Tensor:
        """``tgt``/``query_pos``: ``(B, Q, C)``; ``reference_points``: ``(B, Q, L, 4)``; ``memory``: ``(B, N, C)``;
        ``self_attn_mask``: ``(Q, Q)`` bool, True = blocked."""
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=False)[0])
        attended = self.cross_attn(tgt + query_pos, reference_points, memory, layout, memory_padding_mask)
        tgt = self.norm2(tgt + attended)
        return self.norm3(tgt + self.ffn(tgt))


class DeformableDecoder(nn.Module):
    """Refines boxes layer by layer with a fixed query position (Deformable-DETR two-stage, mixed selection).

    ``refine_eps``: clamp of ``inverse_sigmoid`` in the box refinement (Deformable-DETR 1e-5, DINO 1e-3).
    """

    def __init__(
        self,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        ffn_dims: int = 1024,
        attention_impl: str = "auto",
        refine_eps: float = 1e-5,
    ):
        super().__init__()
        self.embed_dims, self.refine_eps = embed_dims, refine_eps
        self.layers = nn.ModuleList(
            DinoDecoderLayer(embed_dims, num_heads, num_levels, num_points, ffn_dims, attention_impl)
            for _ in range(num_layers)
        )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_position(self, query_pos: Tensor | None, reference_input: Tensor) -> Tensor:
        """Query position of a layer: the given one (``reference_input`` ``(B, Q, L, 4)`` unused here)."""
        if query_pos is None:
            raise ValueError(f"{type(self).__name__} needs query_pos (its position is fixed across layers)")
        return query_pos

    def layer_output(self, tgt: Tensor) -> Tensor:
        """What the prediction heads read of a layer's output (here: the output itself)."""
        return tgt

    def forward(
        self,
        query: Tensor,
        reference: Tensor,
        memory: Tensor,
        layout: LevelLayout,
        valid_ratios: Tensor,
        memory_padding_mask: Tensor | None,
        reg_branches: nn.ModuleList,
        self_attn_mask: Tensor | None = None,
        query_pos: Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Run every layer.

        Args:
            query: content queries ``(B, Q, C)``.
            reference: initial boxes ``(B, Q, 4)`` sigmoid cxcywh (normalised by the valid image size), detached.
            valid_ratios: ``(B, L, 2)`` (w_ratio, h_ratio).
            reg_branches: the head's per-layer box regressors (index k refines layer k's boxes).
            query_pos: ``(B, Q, C)`` position of every layer (:class:`DeformableDecoder`; DINO computes its own).

        Returns:
            hidden: D tensors ``(B, Q, C)`` (:meth:`layer_output`); references: D+1 tensors ``(B, Q, 4)``: the
            initial boxes then each layer's refined boxes, *not* detached (look forward twice).
        """
        ratios = valid_ratios.repeat(1, 1, 2)[:, None]  # (B, 1, L, 4)
        hidden, references = [], [reference]
        tgt = query
        for index, layer in enumerate(self.layers):
            reference_input = reference[:, :, None] * ratios  # (B, Q, L, 4)
            position = self.layer_position(query_pos, reference_input)
            tgt = layer(tgt, position, reference_input, memory, layout, memory_padding_mask, self_attn_mask)
            refined = (reg_branches[index](tgt) + inverse_sigmoid(reference, eps=self.refine_eps)).sigmoid()
            reference = refined.detach()
            hidden.append(self.layer_output(tgt))
            references.append(refined)
        return hidden, references


class DinoDecoder(DeformableDecoder):
    """DINO's decoder: ``ref_point_head`` turns the sine embedding of each layer's input box into the query
    position; ``norm`` is the shared output LayerNorm whose result the prediction heads read."""

    def __init__(
        self,
        num_layers: int = 6,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 5,
        num_points: int = 4,
        ffn_dims: int = 2048,
        attention_impl: str = "auto",
    ):
        super().__init__(num_layers, embed_dims, num_heads, num_levels, num_points, ffn_dims, attention_impl, 1e-3)
        self.ref_point_head = nn.Sequential(
            nn.Linear(2 * embed_dims, embed_dims), nn.ReLU(), nn.Linear(embed_dims, embed_dims)
        )
        self.norm = nn.LayerNorm(embed_dims)

    def layer_position(self, query_pos: Tensor | None, reference_input: Tensor) -> Tensor:
        return self.ref_point_head(box_sine_embedding(reference_input[:, :, 0], self.embed_dims // 2))

    def layer_output(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt)
