"""Anchor layout of the auxiliary heads, checked against hand-computed values
(docs/architecture.md#atss, #rpn, pitfall 18)."""

from __future__ import annotations

import math

import torch

from codetr.models.anchors import AnchorGenerator

STRIDES = (4, 8, 16, 32, 64, 128)


def test_rpn_base_anchors_ratio_major_and_centred_at_origin():
    gen = AnchorGenerator(STRIDES, ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    assert gen.num_base_anchors == 9
    base = gen.base_anchors[0]  # stride 4
    # a = 0: ratio 0.5 (h/w), scale 4 -> w = 4 * sqrt(2) * 4, h = 4 / sqrt(2) * 4
    w, h = 16 * math.sqrt(2), 16 / math.sqrt(2)
    torch.testing.assert_close(base[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    # a = 4: ratio 1, scale 4 * 2^(1/3)
    side = 4 * 4 * 2 ** (1 / 3)
    torch.testing.assert_close(base[4], torch.tensor([-side / 2, -side / 2, side / 2, side / 2]))
    # a = 8: ratio 2, scale 4 * 2^(2/3): tall box
    w, h = 16 * 2 ** (2 / 3) / math.sqrt(2), 16 * 2 ** (2 / 3) * math.sqrt(2)
    torch.testing.assert_close(base[8], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    # sizes scale with the stride
    torch.testing.assert_close(gen.base_anchors[5], base * 32)


def test_atss_anchor_is_8_stride_square_at_cell_corner():
    gen = AnchorGenerator(STRIDES, ratios=(1.0,), octave_base_scale=8, scales_per_octave=1)
    anchors = gen.level_anchors(1, (3, 4))  # stride 8, 3 rows x 4 cols
    assert anchors.shape == (12, 4)
    # location (y=1, x=2) is row 1 * 4 + 2 = 6; centre (16, 8), side 64
    torch.testing.assert_close(anchors[6], torch.tensor([-16.0, -24.0, 48.0, 40.0]))
    torch.testing.assert_close(anchors[0], torch.tensor([-32.0, -32.0, 32.0, 32.0]))


def test_flattening_order_is_location_then_anchor():
    gen = AnchorGenerator((4,), ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    anchors = gen.level_anchors(0, (2, 3)).view(2, 3, 9, 4)
    centres = (anchors[..., :2] + anchors[..., 2:]) / 2
    for y in range(2):
        for x in range(3):
            torch.testing.assert_close(centres[y, x], torch.tensor([[4.0 * x, 4.0 * y]]).expand(9, 2))
            torch.testing.assert_close(
                anchors[y, x] - anchors[0, 0], torch.tensor([4.0 * x, 4.0 * y] * 2).expand(9, 4)
            )


def test_valid_flags_use_ceil_of_image_size_over_stride():
    gen = AnchorGenerator((4, 8), ratios=(1.0,), octave_base_scale=8, scales_per_octave=1)
    flags = gen.valid_flags([(4, 5), (2, 3)], image_size=(10, 13))
    # stride 4: valid rows ceil(10/4) = 3 of 4, cols ceil(13/4) = 4 of 5
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[:3, :4] = True
    assert torch.equal(flags[0], expected.view(-1))
    # stride 8: rows ceil(10/8) = 2, cols ceil(13/8) = 2 of 3
    expected = torch.zeros(2, 3, dtype=torch.bool)
    expected[:2, :2] = True
    assert torch.equal(flags[1], expected.view(-1))


def test_valid_flags_repeat_per_base_anchor():
    gen = AnchorGenerator((16,), ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    flags = gen.valid_flags([(2, 2)], image_size=(16, 32))[0].view(2, 2, 9)
    assert flags[0].all() and not flags[1].any()


def test_anchor_counts_of_the_tiny_oracle_images():
    """Hand count: levels 40x56, 20x28, 10x14, 5x7, 3x4, 2x2; image 1 is 128x192 inside a 160x224 batch."""
    gen = AnchorGenerator(STRIDES, ratios=(0.5, 1.0, 2.0), octave_base_scale=4, scales_per_octave=3)
    sizes = [(40, 56), (20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]
    assert sum(len(a) for a in gen.grid_anchors(sizes)) == 9 * 2991
    assert sum(int(f.sum()) for f in gen.valid_flags(sizes, (160, 224))) == 26919
    # 128x192: 32*48 + 16*24 + 8*12 + 4*6 + 2*3 + 1*2 locations
    assert sum(int(f.sum()) for f in gen.valid_flags(sizes, (128, 192))) == 9 * (1536 + 384 + 96 + 24 + 6 + 2)
