"""Feed-forward block shared by the encoder and decoder layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FFN(nn.Module):
    """``fc2(relu(fc1(x)))``; the reference uses dropout 0 everywhere, so none is built.

    CPU inference runs the tokens in row blocks of at most ``CPU_BLOCK_ELEMENTS / hidden_dims`` tokens: the
    (tokens, hidden) intermediate of the R50 encoder at 512x512 is 178 MB, which glibc maps fresh (and the
    kernel zero-fills page by page) in every layer; a 16 MB block is reused from the heap and stays closer to the
    caches. Rows are independent, so the result is the same numbers (test); training keeps one block for
    autograd.
    """

    CPU_BLOCK_ELEMENTS = 4 * 2**20

    def __init__(self, embed_dims: int = 256, hidden_dims: int = 2048):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        """``(..., C)`` -> ``(..., C)``."""
        # On (tokens, C) rows, as nn.Linear does internally: fc1's output is then a tensor of its own, not a view,
        # so the in-place ReLU costs nothing in backward (on a view autograd rebuilds the whole base per layer:
        # measured 2-3 s of the R50 train step in zero-fills and copies).
        rows = x.reshape(-1, x.shape[-1])
        block = max(1, self.CPU_BLOCK_ELEMENTS // self.fc1.out_features)
        # traced graphs (export, compile) take one block: the loop's trip count would depend on the input size
        if x.device.type != "cpu" or torch.is_grad_enabled() or torch.compiler.is_compiling() or rows.shape[0] <= block:
            out = self.fc2(self.act(self.fc1(rows)))
        else:
            out = rows.new_empty(rows.shape[0], self.fc2.out_features)
            for start in range(0, rows.shape[0], block):
                out[start : start + block] = self.fc2(self.act(self.fc1(rows[start : start + block])))
        return out.view(*x.shape[:-1], -1)
