"""What the two-stage deformable transformers of Co-DINO and Co-Deformable-DETR share: the deformable encoder
over the flattened pyramid, the per-token encoder proposals and their scoring by the head's last branches
(docs/architecture.md#encoder-inputs-3.5). Subclasses add the query selection and the decoder."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from codetr.models.transformer.encoder import DeformableEncoder
from codetr.models.transformer.ms_deform_attn import LevelLayout, MultiScaleDeformableAttention


@dataclass
class EncoderState:
    """memory ``(B, N, C)``; padding_mask ``(B, N)`` bool (True = padding); valid_ratios ``(B, L, 2)`` (w, h)."""

    memory: Tensor
    padding_mask: Tensor
    layout: LevelLayout
    valid_ratios: Tensor


@dataclass
class TransformerOutput:
    """hidden: D x ``(B, Q, C)`` decoder states the heads read (Q = Nd + Nq in training with denoising);
    references: D+1 x ``(B, Q, 4)`` sigmoid cxcywh boxes entering each layer (+ the last refinement);
    enc_logits ``(B, N, K)`` / enc_topk_indices ``(B, Nq)`` / enc_topk_logits ``(B, Nq, K)`` /
    enc_topk_boxes ``(B, Nq, 4)`` sigmoid cxcywh (not detached: the encoder loss trains them);
    enc_boxes ``(B, N, 4)`` sigmoid cxcywh of every token (1.0 where the proposal is invalid)."""

    hidden: list[Tensor]
    references: list[Tensor]
    enc_logits: Tensor
    enc_topk_indices: Tensor
    enc_topk_logits: Tensor
    enc_topk_boxes: Tensor
    encoder: EncoderState
    enc_boxes: Tensor | None = None


def valid_ratios_of(mask: Tensor) -> Tensor:
    """``(B, H, W)`` padding mask -> ``(B, 2)`` (valid width / W, valid height / H) from the first row/column."""
    _, h, w = mask.shape
    valid_h = (~mask[:, :, 0]).sum(1).float() / h
    valid_w = (~mask[:, 0, :]).sum(1).float() / w
    return torch.stack([valid_w, valid_h], -1)


@dataclass
class ScoredTokens:
    """Every encoder token as a proposal: ``logits`` ``(B, N', K)`` and ``coords`` ``(B, N', 4)`` cxcywh logits
    (+inf where invalid); N' >= the number of queries (extra slots look like padding)."""

    logits: Tensor
    coords: Tensor


class TwoStageTransformer(nn.Module):
    """Level embeddings, the injected encoder and decoder, and the encoder-output projection (``enc_output``,
    ``enc_output_norm``), reference parameter names and registration order.

    Args:
        encoder: a built :class:`DeformableEncoder`; decoder: the subclass's built decoder (``num_layers``).
        embed_dims / num_levels: width C and number of pyramid levels L (checked against the inputs).
        proposal_base_size / proposal_valid_range: encoder proposals (side ``base * 2**level``, kept where every
            coordinate lies inside the range).
    """

    def __init__(
        self,
        encoder: DeformableEncoder,
        decoder: nn.Module,
        embed_dims: int = 256,
        num_levels: int = 4,
        proposal_base_size: float = 0.05,
        proposal_valid_range: tuple[float, float] = (0.01, 0.99),
    ):
        super().__init__()
        self.embed_dims, self.num_levels = embed_dims, num_levels
        self.proposal_base_size, self.proposal_valid_range = proposal_base_size, tuple(proposal_valid_range)
        self.level_embeds = nn.Parameter(torch.empty(num_levels, embed_dims))
        self.encoder = encoder
        self.decoder = decoder
        self.enc_output = nn.Linear(embed_dims, embed_dims)
        self.enc_output_norm = nn.LayerNorm(embed_dims)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The original init: Xavier on every matrix, MSDA's own init, N(0, 1) level embeddings (subclasses add
        their embeddings)."""
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MultiScaleDeformableAttention):
                m.init_weights()
        nn.init.normal_(self.level_embeds)

    # ------------------------------------------------------------------ encoder
    def encode(self, feats: list[Tensor], level_masks: list[Tensor], level_pos: list[Tensor]) -> EncoderState:
        """``feats``/``level_pos``: L x ``(B, C, h, w)``; ``level_masks``: L x ``(B, h, w)`` bool."""
        if len(feats) != self.num_levels:
            raise ValueError(f"the transformer has {self.num_levels} levels (num_levels) but got {len(feats)} maps")
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
        """Fixed-size proposal per token (docs/architecture.md#two-stage-proposals).

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

    def score_tokens(
        self, state: EncoderState, cls_branches: nn.ModuleList, reg_branches: nn.ModuleList, num_queries: int
    ) -> ScoredTokens:
        """Class logits and refined box logits of every token by the branches at index D (after the decoder's)."""
        output_memory, proposals = self.encoder_proposals(state)
        shortfall = num_queries - output_memory.shape[1]
        if shortfall > 0:
            # Fewer tokens than queries (tiny or extremely thin images): the extra slots look exactly like padded
            # pixels (zero memory, +inf proposal), as if the batch had been padded to a larger canvas.
            output_memory = F.pad(output_memory, (0, 0, 0, shortfall))
            proposals = F.pad(proposals, (0, 0, 0, shortfall), value=float("inf"))
        enc_index = self.decoder.num_layers
        logits = cls_branches[enc_index](output_memory)
        return ScoredTokens(logits, reg_branches[enc_index](output_memory) + proposals)


def gather_tokens(values: Tensor, index: Tensor) -> Tensor:
    """``values`` ``(B, N, D)`` at ``index`` ``(B, k)`` -> ``(B, k, D)``."""
    return torch.gather(values, 1, index.unsqueeze(-1).expand(-1, -1, values.shape[-1]))
