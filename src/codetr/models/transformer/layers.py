"""Feed-forward block shared by the encoder and decoder layers."""

from __future__ import annotations

from torch import Tensor, nn


class FFN(nn.Module):
    """``fc2(relu(fc1(x)))``; the reference uses dropout 0 everywhere, so none is built."""

    def __init__(self, embed_dims: int = 256, hidden_dims: int = 2048):
        super().__init__()
        self.fc1 = nn.Linear(embed_dims, hidden_dims)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dims, embed_dims)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))
