"""The compiled CPU deformable-attention kernel equals the exact PyTorch path (values and gradients)."""

import pytest
import torch

from codetr.models.transformer.ms_deform_attn import (
    LevelLayout,
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
)
from codetr.models.transformer.ms_deform_attn_cpu import (
    cpu_kernel_available,
    multi_scale_deformable_attention_cpu,
)

pytestmark = pytest.mark.skipif(not cpu_kernel_available(), reason="no C++ compiler: CPU kernel not built")
SHAPES = [(7, 9), (4, 5), (2, 3)]


def random_inputs(dtype, batch=2, queries=30, heads=3, dims=4, points=2):
    torch.manual_seed(0)
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, tokens, heads, dims, dtype=dtype, requires_grad=True)
    locations = (torch.rand(batch, queries, heads, len(SHAPES), points, 2, dtype=dtype) * 1.2 - 0.1).requires_grad_()
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, dtype=dtype).softmax(-1).requires_grad_()
    return value, locations, weights


@pytest.mark.parametrize("dims", [4, 32])  # 32: the channel loops compiled for the model's head width
def test_kernel_matches_exact_path_in_float64_values_and_gradients(dims):
    value, locations, weights = random_inputs(torch.float64, dims=dims)
    exact = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    fast = multi_scale_deformable_attention_cpu(value, SHAPES, locations, weights)
    torch.testing.assert_close(fast, exact, atol=1e-12, rtol=1e-12)
    g_exact = torch.autograd.grad(exact.square().sum(), (value, locations, weights))
    g_fast = torch.autograd.grad(fast.square().sum(), (value, locations, weights))
    for a, b in zip(g_fast, g_exact):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_kernel_gradcheck():
    value, locations, weights = random_inputs(torch.float64, batch=1, queries=5)
    assert torch.autograd.gradcheck(
        lambda v, l, w: multi_scale_deformable_attention_cpu(v, SHAPES, l, w), (value, locations, weights)
    )


def test_module_auto_impl_equals_pytorch_impl_in_float32():
    torch.manual_seed(0)
    fast = MultiScaleDeformableAttention(32, 4, len(SHAPES), 3, impl="auto")
    exact = MultiScaleDeformableAttention(32, 4, len(SHAPES), 3, impl="pytorch")
    exact.load_state_dict(fast.state_dict())
    with torch.no_grad():
        for m in (fast, exact):
            m.sampling_offsets.weight.normal_(0, 0.1)
            m.attention_weights.weight.normal_(0, 0.1)
        exact.load_state_dict(fast.state_dict())
    layout = LevelLayout.from_shapes(SHAPES, torch.device("cpu"))
    tokens = layout.num_tokens
    query, value, ref = torch.randn(2, 11, 32), torch.randn(2, tokens, 32), torch.rand(2, 11, len(SHAPES), 4)
    torch.testing.assert_close(fast(query, ref, value, layout), exact(query, ref, value, layout), atol=1e-5, rtol=1e-5)
