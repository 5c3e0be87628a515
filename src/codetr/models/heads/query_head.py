"""What the query heads of Co-DINO and Co-Deformable-DETR share: the sine encoding of every level's padding
mask, the cloned per-layer class / box branches (D decoder layers + the encoder-token scorer), the ``downsample``
that completes the auxiliary pyramid, and per-layer predictions from the decoder states.

Box formats: predictions are sigmoid ``cxcywh`` normalised by each image's valid size ``(h, w)``.
"""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.box_ops import inverse_sigmoid
from codetr.models.safe_conv import SafeStridedConv2d
from codetr.models.transformer.position import SinePositionalEncoding
from codetr.models.transformer.two_stage import EncoderState, TwoStageTransformer


class QueryHeadLoss(NamedTuple):
    """What a query head's ``loss`` returns: the named losses, the encoder state the auxiliary branches read, and the
    last decoder layer's predictions over every query (denoising queries first, as the decoder ran them): logits
    ``(B, Q, K)`` and boxes ``(B, Q, 4)`` sigmoid cxcywh normalised by each image's valid size (the mask branch's
    training boxes)."""

    losses: dict[str, Tensor]
    encoder: EncoderState
    logits: Tensor
    boxes: Tensor


def layer_loss_names(prefix: str, suffix: str, num_layers: int) -> list[tuple[str, str, str]]:
    """Loss names per decoder layer: ``d{k}.`` prefix for all but the last layer (reference naming)."""
    names = []
    for k in range(num_layers):
        lead = "" if k == num_layers - 1 else f"d{k}."
        names.append(tuple(f"{lead}{prefix}loss_{kind}{suffix}" for kind in ("cls", "bbox", "iou")))
    return names


class DETRQueryHead(nn.Module):
    """Base of the query heads (parameter names of the reference: ``transformer``, ``cls_branches``,
    ``reg_branches``, ``downsample``).

    Args:
        num_classes: K foreground classes (sigmoid classification, no background column).
        transformer: the built two-stage transformer; its decoder's layer count and ``refine_eps`` rule the
            branches and the box decoding, its ``num_co_heads`` whether the auxiliary pyramid is built.
        positional_encoding: sine encoding of the level masks (its width must be half the transformer's).
        prior_prob: initial foreground probability of the class branches.
    """

    def __init__(
        self,
        num_classes: int,
        transformer: TwoStageTransformer,
        positional_encoding: SinePositionalEncoding,
        prior_prob: float = 0.01,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.transformer = transformer
        dims = transformer.embed_dims
        if 2 * positional_encoding.num_feats != dims:
            raise ValueError(
                f"positional_encoding.num_feats ({positional_encoding.num_feats}) must be embed_dims / 2 ({dims // 2})"
            )
        self.num_layers = transformer.decoder.num_layers
        self.positional_encoding = positional_encoding
        # The reference clones one freshly initialised branch D+1 times (identical initial weights).
        cls_branch = nn.Linear(dims, num_classes)
        nn.init.constant_(cls_branch.bias, -math.log((1 - prior_prob) / prior_prob))
        reg_branch = nn.Sequential(
            nn.Linear(dims, dims), nn.ReLU(), nn.Linear(dims, dims), nn.ReLU(), nn.Linear(dims, 4)
        )
        nn.init.zeros_(reg_branch[-1].weight)
        nn.init.zeros_(reg_branch[-1].bias)
        self.cls_branches = nn.ModuleList(copy.deepcopy(cls_branch) for _ in range(self.num_layers + 1))
        self.reg_branches = nn.ModuleList(copy.deepcopy(reg_branch) for _ in range(self.num_layers + 1))
        # The extra level feeds only the auxiliary heads: without auxiliary branches (transformer.num_co_heads = 0,
        # plain DINO / Deformable-DETR) there is none, so every parameter is trained (DDP needs that).
        self.downsample = (
            # SafeStridedConv2d: the last map is one pixel wide on small images (a bf16 CPU kernel bug, see there)
            nn.Sequential(SafeStridedConv2d(dims, dims, 3, stride=2, padding=1), nn.GroupNorm(32, dims))
            if transformer.num_co_heads > 0 else None
        )

    def level_masks(self, feats: list[Tensor], img_mask: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Nearest-resized padding masks ``(B, h, w)`` and their sine encodings ``(B, C, h, w)`` per level."""
        masks = [F.interpolate(img_mask[None].float(), size=f.shape[-2:]).to(torch.bool)[0] for f in feats]
        return masks, [self.positional_encoding(m) for m in masks]

    def predictions(self, hidden: list[Tensor], references: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Per decoder layer k: logits ``cls_k(h_k)`` and boxes ``sigmoid(reg_k(h_k) + logit(ref_k))``."""
        eps = self.transformer.decoder.refine_eps
        logits, boxes = [], []
        for k, state in enumerate(hidden):
            logits.append(self.cls_branches[k](state))
            boxes.append((self.reg_branches[k](state) + inverse_sigmoid(references[k], eps=eps)).sigmoid())
        return logits, boxes

    def encoder_pyramid(self, state: EncoderState) -> list[Tensor]:
        """Encoder memory back to its L maps ``(B, C, h, w)`` (what the mask branch reads)."""
        batch, _, dims = state.memory.shape
        return [
            chunk.transpose(1, 2).reshape(batch, dims, h, w)
            for chunk, (h, w) in zip(
                state.memory.split([h * w for h, w in state.layout.shapes], 1), state.layout.shapes
            )
        ]

    def aux_pyramid(self, state: EncoderState) -> list[Tensor]:
        """Encoder memory back to L maps ``(B, C, h, w)`` plus ``downsample`` of the last: the one-to-many heads'
        input (one level more than the encoder's). Not detached: their losses train the encoder."""
        if self.downsample is None:
            raise ValueError("auxiliary heads need the query head's downsample: set transformer.num_co_heads > 0")
        maps = self.encoder_pyramid(state)
        return maps + [self.downsample(maps[-1])]
