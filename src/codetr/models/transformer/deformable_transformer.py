"""The transformer of Co-Deformable-DETR: deformable encoder, two-stage proposals with mixed query selection
(top-k by the first class logit, a position embedding of the selected boxes that every decoder layer keeps), the
Deformable-DETR decoder, and the decoder pass for Co-DETR's customised positive queries with candidate features.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.models.box_ops import inverse_sigmoid
from codetr.models.transformer.decoder import DeformableDecoder
from codetr.models.transformer.encoder import DeformableEncoder
from codetr.models.transformer.position import proposal_sine_embedding
from codetr.models.transformer.two_stage import (
    EncoderState,
    TransformerOutput,
    TwoStageTransformer,
    gather_tokens,
)


class CoDeformableTransformer(TwoStageTransformer):
    """Parameter names follow the reference (``pos_trans``, ``pos_trans_norm``; per auxiliary branch
    ``aux_pos_trans``, ``aux_pos_trans_norm``, ``pos_feats_trans``, ``pos_feats_norm`` and ``head_pos_embed``).

    ``head_pos_embed`` is ``(num_co_heads, 1)``: the reference meant one C-vector per branch but built a single
    learnt scalar (kept there "for reproducing our results with ResNet-50"), added to every channel of the
    branch's query position. We keep the scalar so official checkpoints load and behave the same.

    The number of queries is the number of content queries the head passes in (its ``query_embedding``).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dims: int = 2048,
        num_co_heads: int = 2,
        encoder_checkpoint_layers: int = 0,
        proposal_base_size: float = 0.05,
        proposal_valid_range: tuple[float, float] = (0.01, 0.99),
        refine_eps: float = 1e-5,
        attention_impl: str = "auto",
    ):
        encoder = DeformableEncoder(
            num_encoder_layers, embed_dims, num_heads, num_levels, num_points, ffn_dims, encoder_checkpoint_layers,
            attention_impl,
        )
        decoder = DeformableDecoder(
            num_decoder_layers, embed_dims, num_heads, num_levels, num_points, ffn_dims, attention_impl, refine_eps
        )
        super().__init__(encoder, decoder, embed_dims, num_levels, proposal_base_size, proposal_valid_range)
        self.refine_eps = refine_eps
        self.num_co_heads = num_co_heads
        self.pos_trans = nn.Linear(2 * embed_dims, 2 * embed_dims)
        self.pos_trans_norm = nn.LayerNorm(2 * embed_dims)
        if num_co_heads > 0:
            self.head_pos_embed = nn.Embedding(num_co_heads, 1)
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * embed_dims, 2 * embed_dims) for _ in range(num_co_heads))
        self.aux_pos_trans_norm = nn.ModuleList(nn.LayerNorm(2 * embed_dims) for _ in range(num_co_heads))
        self.pos_feats_trans = nn.ModuleList(nn.Linear(embed_dims, embed_dims) for _ in range(num_co_heads))
        self.pos_feats_norm = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(num_co_heads))
        self.init_weights()

    def query_position(self, projection: nn.Linear, norm: nn.LayerNorm, box_logits: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, Q, 4)`` box logits -> (position, content) ``(B, Q, C)`` each: halves of LN(Linear(sine(boxes)))."""
        out = norm(projection(proposal_sine_embedding(box_logits, self.embed_dims // 2)))
        return out[..., : self.embed_dims], out[..., self.embed_dims :]

    def forward(
        self,
        feats: list[Tensor],
        level_masks: list[Tensor],
        level_pos: list[Tensor],
        content_queries: Tensor,
        cls_branches: nn.ModuleList,
        reg_branches: nn.ModuleList,
    ) -> TransformerOutput:
        """Encoder, top-Q selection by the first class logit, decoder.

        Args:
            feats / level_pos: L x ``(B, C, h, w)``; level_masks: L x ``(B, h, w)`` bool (True = padding).
            content_queries: ``(Q, C)`` learnt content queries (mixed selection), shared by all images.
            cls_branches / reg_branches: D+1 entries; index D scores the encoder tokens.

        Returns:
            :class:`TransformerOutput`; ``enc_boxes`` holds every token's box (the encoder loss reads all of them),
            ``enc_topk_boxes`` the detached selected boxes = the decoder's initial references.
        """
        num_queries = content_queries.shape[0]
        state = self.encode(feats, level_masks, level_pos)
        tokens = self.score_tokens(state, cls_branches, reg_branches, num_queries)
        topk = torch.topk(tokens.logits[..., 0], num_queries, dim=1)[1]
        topk_logits = gather_tokens(tokens.logits, topk)
        topk_coords = gather_tokens(tokens.coords, topk).detach()
        reference = topk_coords.sigmoid()
        query_pos, _ = self.query_position(self.pos_trans, self.pos_trans_norm, topk_coords)
        query = content_queries[None].expand(state.memory.shape[0], -1, -1)
        hidden, references = self.decoder(
            query, reference, state.memory, state.layout, state.valid_ratios, state.padding_mask, reg_branches,
            None, query_pos,
        )
        return TransformerOutput(
            hidden, references, tokens.logits, topk, topk_logits, reference, state, tokens.coords.sigmoid()
        )

    def forward_aux(
        self, state: EncoderState, boxes: Tensor, features: Tensor, head_index: int, reg_branches: nn.ModuleList
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Decoder pass on customised positive queries of auxiliary branch ``head_index``.

        ``boxes``: ``(B, M, 4)`` normalised cxcywh candidate boxes (references and the source of position and
        content); ``features``: ``(B, M, C)`` candidate features added to the content. Returns (hidden, references).
        """
        query_pos, query = self.query_position(
            self.aux_pos_trans[head_index], self.aux_pos_trans_norm[head_index],
            inverse_sigmoid(boxes, eps=self.refine_eps),
        )
        query = query + self.pos_feats_norm[head_index](self.pos_feats_trans[head_index](features))
        query_pos = query_pos + self.head_pos_embed.weight[head_index]
        return self.decoder(
            query, boxes, state.memory, state.layout, state.valid_ratios, state.padding_mask, reg_branches,
            None, query_pos,
        )
