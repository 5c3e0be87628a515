"""The DINO transformer of Co-DINO: deformable encoder, two-stage proposals with mixed query selection,
DINO decoder, and the decoder pass for Co-DETR's customised positive queries
(docs/architecture.md#encoder-inputs-3.10)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.models.box_ops import inverse_sigmoid
from codetr.models.transformer.decoder import DinoDecoder
from codetr.models.transformer.denoising import DenoisingQueries
from codetr.models.transformer.encoder import DeformableEncoder
from codetr.models.transformer.position import proposal_sine_embedding
from codetr.models.transformer.two_stage import (
    EncoderState,
    TransformerOutput,
    TwoStageTransformer,
    gather_tokens,
)


class DinoTransformer(TwoStageTransformer):
    """Parameter names follow the reference (``level_embeds``, ``encoder``, ``decoder``, ``enc_output``,
    ``enc_output_norm``, ``query_embed``, ``aux_pos_trans``, ``aux_pos_trans_norm``).

    ``encoder_checkpoint_layers``: activation checkpointing of the first N encoder layers (reference: 4 for R50,
    6 for Swin-L/ViT-L; no numerical effect). ``attention_impl``: deformable-attention kernel (auto, pytorch,
    cpu_kernel; see :mod:`codetr.models.transformer.ms_deform_attn`).
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 5,
        num_points: int = 4,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        ffn_dims: int = 2048,
        num_queries: int = 900,
        num_co_heads: int = 2,
        encoder_checkpoint_layers: int = 0,
        proposal_base_size: float = 0.05,
        proposal_valid_range: tuple[float, float] = (0.01, 0.99),
        attention_impl: str = "auto",
    ):
        encoder = DeformableEncoder(
            num_encoder_layers, embed_dims, num_heads, num_levels, num_points, ffn_dims, encoder_checkpoint_layers,
            attention_impl,
        )
        decoder = DinoDecoder(
            num_decoder_layers, embed_dims, num_heads, num_levels, num_points, ffn_dims, attention_impl
        )
        super().__init__(encoder, decoder, embed_dims, num_levels, proposal_base_size, proposal_valid_range)
        self.num_queries = num_queries
        self.num_co_heads = num_co_heads
        self.query_embed = nn.Embedding(num_queries, embed_dims)
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * embed_dims, embed_dims) for _ in range(num_co_heads))
        self.aux_pos_trans_norm = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(num_co_heads))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original Co-DETR init (:meth:`TwoStageTransformer.init_weights`) plus N(0, 1) query embeddings."""
        super().init_weights()
        nn.init.normal_(self.query_embed.weight)

    # ------------------------------------------------------------------ full pass
    def forward(
        self,
        feats: list[Tensor],
        level_masks: list[Tensor],
        level_pos: list[Tensor],
        cls_branches: nn.ModuleList,
        reg_branches: nn.ModuleList,
        denoising: DenoisingQueries | None = None,
    ) -> TransformerOutput:
        """Encoder, top-``num_queries`` proposal selection (max class logit), decoder on [DN ; matching] queries.

        ``cls_branches``/``reg_branches`` have D+1 entries; index D scores the encoder proposals.
        """
        state = self.encode(feats, level_masks, level_pos)
        tokens = self.score_tokens(state, cls_branches, reg_branches, self.num_queries)
        enc_logits = tokens.logits
        topk = torch.topk(enc_logits.max(-1)[0], self.num_queries, dim=1)[1]
        topk_logits = gather_tokens(enc_logits, topk)
        topk_coords = gather_tokens(tokens.coords, topk)
        topk_boxes = topk_coords.sigmoid()

        batch = state.memory.shape[0]
        query = self.query_embed.weight[None].expand(batch, -1, -1)
        reference_logits = topk_coords.detach()
        attn_mask = None
        if denoising is not None:
            query = torch.cat([denoising.label_query, query], 1)
            reference_logits = torch.cat([denoising.bbox_query, reference_logits], 1)
            attn_mask = denoising.attn_mask
        hidden, references = self.decoder(
            query,
            reference_logits.sigmoid(),
            state.memory,
            state.layout,
            state.valid_ratios,
            state.padding_mask,
            reg_branches,
            attn_mask,
        )
        return TransformerOutput(hidden, references, enc_logits, topk, topk_logits, topk_boxes, state)

    def forward_aux(
        self, state: EncoderState, boxes: Tensor, head_index: int, reg_branches: nn.ModuleList
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Decoder pass on customised positive queries of auxiliary branch ``head_index``
        (docs/architecture.md#positive-queries).

        ``boxes``: ``(B, M, 4)`` normalised cxcywh candidate boxes (references and content source).
        No denoising, no attention mask. Returns the decoder's (hidden, references).
        """
        embedding = proposal_sine_embedding(inverse_sigmoid(boxes), self.embed_dims // 2)
        query = self.aux_pos_trans_norm[head_index](self.aux_pos_trans[head_index](embedding))
        return self.decoder(
            query, boxes, state.memory, state.layout, state.valid_ratios, state.padding_mask, reg_branches, None
        )
