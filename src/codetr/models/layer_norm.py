"""Channel LayerNorm of NCHW maps in the reference's arithmetic (the ``LayerNorm`` of the SFP neck and ``LN2d`` of
the mask heads): ``(x - mean_c) / sqrt(var_c + eps) * weight + bias`` with the biased variance, computed as written.

``torch.nn.functional.layer_norm`` (timm's ``LayerNorm2d``) computes the same function with another reduction and
``rsqrt``; the difference is a few float32 steps per call, but a stack of normalised 3x3 convs on near-constant
channels amplifies it (measured 9e-5 on the mask head's semantic branch after two blocks), so the parts compared
with the official code use this one. Same parameters (``weight``, ``bias``) and state-dict keys.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ChannelLayerNorm(nn.Module):
    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def extra_repr(self) -> str:
        return f"{len(self.weight)}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]
