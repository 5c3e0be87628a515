"""The DINO transformer of Co-DINO: deformable encoder, two-stage proposals with mixed query selection,
DINO decoder, and the decoder pass for Co-DETR's customised positive queries (spec 3.1-3.10)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from codetr.models.box_ops import inverse_sigmoid
from codetr.models.transformer.decoder import DinoDecoder
from codetr.models.transformer.denoising import DenoisingQueries
from codetr.models.transformer.encoder import DeformableEncoder
from codetr.models.transformer.ms_deform_attn import LevelLayout, MultiScaleDeformableAttention
from codetr.models.transformer.position import proposal_sine_embedding


@dataclass
class EncoderState:
    """memory ``(B, N, C)``; padding_mask ``(B, N)`` bool (True = padding); valid_ratios ``(B, L, 2)`` (w, h)."""

    memory: Tensor
    padding_mask: Tensor
    layout: LevelLayout
    valid_ratios: Tensor


@dataclass
class TransformerOutput:
    """hidden: D x ``(B, Q, C)`` normed decoder states (Q = Nd + Nq in training with denoising);
    references: D+1 x ``(B, Q, 4)`` sigmoid cxcywh boxes entering each layer (+ the last refinement);
    enc_logits ``(B, N, K)`` / enc_topk_indices ``(B, Nq)`` / enc_topk_logits ``(B, Nq, K)`` /
    enc_topk_boxes ``(B, Nq, 4)`` sigmoid cxcywh (not detached: the encoder loss trains them)."""

    hidden: list[Tensor]
    references: list[Tensor]
    enc_logits: Tensor
    enc_topk_indices: Tensor
    enc_topk_logits: Tensor
    enc_topk_boxes: Tensor
    encoder: EncoderState


def valid_ratios_of(mask: Tensor) -> Tensor:
    """``(B, H, W)`` padding mask -> ``(B, 2)`` (valid width / W, valid height / H) from the first row/column."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


class DinoTransformer(nn.Module):
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
        super().__init__()
        self.embed_dims, self.num_levels, self.num_queries = embed_dims, num_levels, num_queries
        self.proposal_base_size, self.proposal_valid_range = proposal_base_size, tuple(proposal_valid_range)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dims))
        self.encoder = DeformableEncoder(
            num_encoder_layers, embed_dims, num_heads, num_levels, num_points, ffn_dims, encoder_checkpoint_layers,
            attention_impl,
        )
        self.decoder = DinoDecoder(
            num_decoder_layers, embed_dims, num_heads, num_levels, num_points, ffn_dims, attention_impl
        )
        self.enc_output = nn.Linear(embed_dims, embed_dims)
        self.enc_output_norm = nn.LayerNorm(embed_dims)
        self.query_embed = nn.Embedding(num_queries, embed_dims)
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * embed_dims, embed_dims) for _ in range(num_co_heads))
        self.aux_pos_trans_norm = nn.ModuleList(nn.LayerNorm(embed_dims) for _ in range(num_co_heads))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original Co-DETR init: Xavier on every matrix, MSDA's own init, N(0, 1) level/query embeddings."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        nn.init.normal_(self.level_embeds)
        nn.init.normal_(self.query_embed.weight)

    # ------------------------------------------------------------------ encoder
    def encode(self, feats: list[Tensor], level_masks: list[Tensor], level_pos: list[Tensor]) -> EncoderState:
        """``feats``/``level_pos``: L x ``(B, C, h, w)``; ``level_masks``: L x ``(B, h, w)`` bool."""
        layout = LevelLayout.from_shapes([tuple(f.shape[-2:]) for f in feats], feats[0].device)
        x = torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embeds[i].view(1, 1, -1) for i, p in enumerate(level_pos)], 1
        )
        mask = torch.cat([m.flatten(1) for m in level_masks], 1)
        valid_ratios = torch.stack([valid_ratios_of(m) for m in level_masks], 1)
        memory = self.encoder(x, pos, layout, valid_ratios, mask)
        return EncoderState(memory, mask, layout, valid_ratios)

    def encoder_proposals(self, state: EncoderState) -> tuple[Tensor, Tensor]:
        """Fixed-size proposal per token (spec 3.5).

        Returns ``output_memory`` ``(B, N, C)`` (= LN(Linear(memory)) with padded/invalid rows zeroed first) and
        ``proposals`` ``(B, N, 4)`` cxcywh logits, +inf where padded or too close to the border.
        """
        batch = state.memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(state.layout.shapes):
            mask = state.padding_mask[:, start : start + h * w].view(batch, h, w)
            valid_h = (~mask[:, :, 0]).sum(1)
            valid_w = (~mask[:, 0, :]).sum(1)
            grid_y, grid_x = torch.meshgrid(
                # = linspace(0, h - 1, h) bitwise; arange keeps traced sizes symbolic (export)
                torch.arange(h, dtype=torch.float32, device=mask.device),
                torch.arange(w, dtype=torch.float32, device=mask.device),
                indexing="ij",
            )
            grid = torch.stack([grid_x, grid_y], -1)
            scale = torch.stack([valid_w, valid_h], -1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * self.proposal_base_size * (2.0**level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        low, high = self.proposal_valid_range
        valid = ((proposals > low) & (proposals < high)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = state.padding_mask.unsqueeze(-1) | ~valid
        proposals = proposals.masked_fill(invalid, float("inf"))
        output_memory = state.memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(output_memory)), proposals

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
        output_memory, proposals = self.encoder_proposals(state)
        shortfall = self.num_queries - output_memory.shape[1]
        if shortfall > 0:
            # Fewer tokens than queries (tiny or extremely thin images): the extra slots look exactly like padded
            # pixels (zero memory, +inf proposal), as if the batch had been padded to a larger canvas.
            output_memory = F.pad(output_memory, (0, 0, 0, shortfall))
            proposals = F.pad(proposals, (0, 0, 0, shortfall), value=float("inf"))
        enc_index = self.decoder.num_layers
        enc_logits = cls_branches[enc_index](output_memory)
        enc_coords = reg_branches[enc_index](output_memory) + proposals
        topk = torch.topk(enc_logits.max(-1)[0], self.num_queries, dim=1)[1]
        topk_logits = torch.gather(enc_logits, 1, topk.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
        topk_coords = torch.gather(enc_coords, 1, topk.unsqueeze(-1).expand(-1, -1, 4))
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
        """Decoder pass on customised positive queries of auxiliary branch ``head_index`` (spec 3.10).

        ``boxes``: ``(B, M, 4)`` normalised cxcywh candidate boxes (references and content source).
        No denoising, no attention mask. Returns the decoder's (hidden, references).
        """
        embedding = proposal_sine_embedding(inverse_sigmoid(boxes), self.embed_dims // 2)
        query = self.aux_pos_trans_norm[head_index](self.aux_pos_trans[head_index](embedding))
        return self.decoder(
            query, boxes, state.memory, state.layout, state.valid_ratios, state.padding_mask, reg_branches, None
        )
