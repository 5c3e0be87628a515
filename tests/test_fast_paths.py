"""CPU fast paths outside the attention kernel compute the same numbers as their plain form."""

import torch

from codetr.models.transformer.layers import FFN
from codetr.models.transformer.ms_deform_attn import _point_locations


def test_point_locations_equal_the_broadcast_form_bitwise():
    torch.manual_seed(0)
    batch, queries, heads, levels, points = 2, 37, 8, 5, 4
    ref = torch.rand(batch, queries, levels, 2)[:, :, None, :, None, :]
    offsets = torch.randn(batch, queries, heads, levels, points, 2) * 3
    normalizer = torch.tensor([[40.0, 32.0], [20.0, 16.0], [10.0, 8.0], [5.0, 4.0], [3.0, 2.0]])
    broadcast = ref + offsets / normalizer[None, None, None, :, None, :]
    assert torch.equal(_point_locations(ref, offsets, normalizer), broadcast)


def test_ffn_cpu_inference_in_row_blocks_equals_one_pass(monkeypatch):
    torch.manual_seed(0)
    ffn = FFN(16, 64)
    x = torch.randn(2, 301, 16)
    whole = ffn.fc2(ffn.act(ffn.fc1(x)))
    monkeypatch.setattr(FFN, "CPU_BLOCK_ELEMENTS", 64 * 50)  # 50-token blocks, the last one partial
    with torch.no_grad():
        blocked = ffn(x)
    assert blocked.shape == x.shape
    torch.testing.assert_close(blocked, whole, atol=1e-6, rtol=1e-6)
    # Training keeps one pass (autograd graph); the gradient path is the plain one.
    y = ffn(x.requires_grad_())
    assert y.grad_fn is not None
    torch.testing.assert_close(y, whole)
