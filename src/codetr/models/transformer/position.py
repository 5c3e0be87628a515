"""Sine positional encodings: of feature-map pixels (encoder) and of boxes (decoder queries, aux queries).

All three interleave ``sin`` at even and ``cos`` at odd feature indices, with frequency
``temperature ** (2 * (i // 2) / num_feats)``; they differ in temperature, normalisation and coordinate order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _frequencies(num_feats: int, temperature: float, device: torch.device) -> Tensor:
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    return temperature ** (2 * (dim_t // 2) / num_feats)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """``(..., F)`` angles -> ``(..., F)`` features ``[sin a0, cos a1, sin a2, cos a3, ...]``."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionalEncoding(nn.Module):
    """2-D sine encoding of a padding mask's valid area (DETR), output ``(B, 2*num_feats, H, W)``, order (y, x)."""

    def __init__(
        self,
        num_feats: int = 128,
        temperature: float = 20.0,
        normalize: bool = True,
        scale: float = 2 * math.pi,
        eps: float = 1e-6,
        offset: float = 0.0,
    ):
        super().__init__()
        self.num_feats, self.temperature, self.normalize = num_feats, temperature, normalize
        self.scale, self.eps, self.offset = scale, eps, offset

    def forward(self, mask: Tensor) -> Tensor:
        """``mask``: ``(B, H, W)`` bool, True = padding."""
        not_mask = (~mask).to(torch.float32)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        if self.normalize:
            y = (y + self.offset) / (y[:, -1:, :] + self.eps) * self.scale
            x = (x + self.offset) / (x[:, :, -1:] + self.eps) * self.scale
        dim_t = _frequencies(self.num_feats, self.temperature, mask.device)
        pos_y = _interleave_sin_cos(y[..., None] / dim_t)
        pos_x = _interleave_sin_cos(x[..., None] / dim_t)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


def box_sine_embedding(boxes: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Decoder query position: ``(..., 4)`` normalised cxcywh -> ``(..., 4*num_feats)`` in order (y, x, w, h)."""
    dim_t = _frequencies(num_feats, temperature, boxes.device)
    parts = [_interleave_sin_cos((boxes[..., i] * (2 * math.pi))[..., None] / dim_t) for i in (1, 0, 2, 3)]
    return torch.cat(parts, dim=-1)


def proposal_sine_embedding(logits: Tensor, num_feats: int, temperature: float = 10000.0) -> Tensor:
    """Aux-query content input: ``(..., 4)`` box logits -> sigmoid -> ``(..., 4*num_feats)`` in order (x, y, w, h)."""
    dim_t = _frequencies(num_feats, temperature, logits.device)
    angles = (logits.sigmoid() * (2 * math.pi))[..., None] / dim_t
    return _interleave_sin_cos(angles).flatten(-2)
