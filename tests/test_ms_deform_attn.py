"""Multi-scale deformable attention: sampling semantics against a direct bilinear computation."""

import math

import torch

from codetr.models.transformer.ms_deform_attn import (
    LevelLayout,
    MultiScaleDeformableAttention,
    multi_scale_deformable_attention,
)


def bilinear(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """Direct bilinear read of ``value_map (D, h, w)`` at normalised (x, y), pixel centres at (i + 0.5) / size,
    zero outside."""
    _, h, w = value_map.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_map.shape[0])
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < w and 0 <= yy < h:
                out += weight * value_map[:, yy, xx]
    return out


def test_sampling_matches_direct_bilinear_computation():
    torch.manual_seed(0)
    shapes = [(4, 5), (2, 3)]
    batch, heads, dims, queries, points = 2, 2, 3, 4, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, dims)
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.2 - 0.1  # some outside
    weights = torch.rand(batch, queries, heads, len(shapes), points)
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    assert out.shape == (batch, queries, heads * dims)
    starts = [0, shapes[0][0] * shapes[0][1]]
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                expected = torch.zeros(dims)
                for level, (h, w) in enumerate(shapes):
                    vmap = value[b, starts[level] : starts[level] + h * w, m].T.reshape(dims, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        expected += weights[b, q, m, level, p] * bilinear(vmap, x, y)
                torch.testing.assert_close(out[b, q, m * dims : (m + 1) * dims], expected, atol=1e-5, rtol=1e-5)


def test_initial_offsets_form_a_ring_of_directions_and_attention_is_uniform():
    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=8, num_levels=2, num_points=3)
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[0, 0], torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]))
    torch.testing.assert_close(bias[2, 1, 0], torch.tensor([0.0, 1.0]), atol=1e-6, rtol=0)  # 90 degrees
    torch.testing.assert_close(bias[1, 0, 1], torch.tensor([2.0, 2.0]))  # 45 degrees, max component 1
    assert torch.equal(bias[:, 0], bias[:, 1])
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0


def test_point_reference_offsets_are_in_level_pixels_and_box_offsets_scale_with_box_size():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dims=8, num_heads=1, num_levels=1, num_points=1)
    with torch.no_grad():
        attn.sampling_offsets.bias.copy_(torch.tensor([1.0, 0.0]))  # one pixel to the right
        attn.value_proj.weight.copy_(torch.eye(8))
        attn.value_proj.bias.zero_()
        attn.output_proj.weight.copy_(torch.eye(8))
        attn.output_proj.bias.zero_()
    layout = LevelLayout.from_shapes([(1, 4)], torch.device("cpu"))
    value = torch.arange(4, dtype=torch.float32)[None, :, None].repeat(1, 1, 8)  # pixel j holds j
    query = torch.zeros(1, 1, 8)
    point = torch.tensor([[[[0.375, 0.5]]]])  # centre of pixel 1
    out = attn(query, point, value, layout)
    torch.testing.assert_close(out[0, 0], torch.full((8,), 2.0))  # moved to pixel 2
    box = torch.tensor([[[[0.375, 0.5, 0.5, 1.0]]]])  # offset 1 * w/2 / P = 0.25 -> centre of pixel 2
    torch.testing.assert_close(attn(query, box, value, layout)[0, 0], torch.full((8,), 2.0))


def test_padded_values_are_ignored():
    torch.manual_seed(0)
    attn = MultiScaleDeformableAttention(embed_dims=8, num_heads=2, num_levels=1, num_points=2)
    layout = LevelLayout.from_shapes([(3, 3)], torch.device("cpu"))
    value = torch.randn(1, 9, 8)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 5:] = True
    query, ref = torch.randn(1, 4, 8), torch.rand(1, 4, 1, 2)
    a = attn(query, ref, value, layout, mask)
    value[0, 5:] = 1e6
    torch.testing.assert_close(attn(query, ref, value, layout, mask), a)


def test_sampling_runs_in_float32_under_autocast():
    attn = MultiScaleDeformableAttention(embed_dims=16, num_heads=2, num_levels=1, num_points=2)
    layout = LevelLayout.from_shapes([(4, 4)], torch.device("cpu"))
    query, value, ref = torch.randn(2, 5, 16), torch.randn(2, 16, 16), torch.rand(2, 5, 1, 2)
    exact = attn(query, ref, value, layout)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = attn(query, ref, value, layout)
    assert torch.isfinite(mixed).all()
    torch.testing.assert_close(mixed.float(), exact, atol=0.1, rtol=0.05)
