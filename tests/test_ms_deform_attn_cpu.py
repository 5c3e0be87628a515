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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_location_gradient_at_integer_pixel_positions_matches_grid_sample(dtype):
    """Bilinear sampling has a kink at every integer pixel position: there the location gradient depends on which
    cell the rounded coordinate falls into. Locations built to land exactly on pixel centres, on the map borders
    and outside them (as zero-size boxes and border reference points do) must take the reference's cell."""
    torch.manual_seed(0)
    batch, queries, heads, dims, points = 2, 64, 2, 4, 2
    tokens = sum(h * w for h, w in SHAPES)
    value = torch.randn(batch, tokens, heads, dims, dtype=dtype, requires_grad=True)
    sizes = torch.tensor([[w, h] for h, w in SHAPES], dtype=dtype)  # (L, 2) as (x, y)
    pixel = torch.randint(-2, 11, (batch, queries, heads, len(SHAPES), points, 2)).to(dtype)
    locations = ((pixel + 0.5) / sizes[:, None, :]).requires_grad_()  # exactly on pixel positions after unnormalising
    weights = torch.rand(batch, queries, heads, len(SHAPES), points, dtype=dtype).requires_grad_()
    exact = multi_scale_deformable_attention(value, SHAPES, locations, weights)
    fast = multi_scale_deformable_attention_cpu(value, SHAPES, locations, weights)
    upstream = torch.randn_like(exact)
    g_exact = torch.autograd.grad((exact * upstream).sum(), (value, locations, weights))
    g_fast = torch.autograd.grad((fast * upstream).sum(), (value, locations, weights))
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for name, a, b in zip(("value", "locations", "weights"), g_fast, g_exact):
        torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol, msg=name)
