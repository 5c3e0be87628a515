"""Anchor generator of the auxiliary dense heads (RPN, ATSS) and the per-image anchor validity flags.

Written by hand: torchvision's ``AnchorGenerator`` centres anchors differently, orders them (anchor, location)
and has no validity flags. This one reproduces the reference layout bit for bit
(docs/architecture.md#atss, #rpn, pitfall 18):

* per level ``l`` with stride ``s``: base anchors centred at ``(0, 0)`` (centre offset 0), sizes
  ``base_size * scale * w_ratio`` x ``base_size * scale * h_ratio`` with ``h_ratio = sqrt(ratio)``,
  ``w_ratio = 1 / h_ratio``, ``base_size = s``; anchor index ``a = ratio_index * len(scales) + scale_index``;
* shifted to every feature location ``(x * s, y * s)`` (the top-left corner of the cell, not its centre);
* flattened in ``(y, x, a)`` order, i.e. matching ``conv_output.permute(0, 2, 3, 1).reshape(-1, ...)``.

All boxes are ``xyxy`` absolute pixels of the network input; computations run in float32 in the reference's
operation order so that IoU ties (low-quality matching, ATSS top-k) resolve identically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class AnchorGenerator:
    """Multi-level anchors.

    Args:
        strides: one stride per pyramid level (pixels), e.g. ``(4, 8, 16, 32, 64, 128)``.
        ratios: ``h / w`` aspect ratios, e.g. RPN ``(0.5, 1.0, 2.0)``, ATSS ``(1.0,)``.
        octave_base_scale, scales_per_octave: scales ``octave_base_scale * 2 ** (i / scales_per_octave)``
            (RPN 4 / 3, ATSS 8 / 1); ignored when ``scales`` is given.
        scales: explicit scales (multiples of the base size).
        base_sizes: base anchor size per level (default: the strides).
        center_offset: anchor centre offset inside a cell as a fraction of the base size (reference: 0).
    """

    def __init__(
        self,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        octave_base_scale: float | None = 4,
        scales_per_octave: int = 3,
        scales: Sequence[float] | None = None,
        base_sizes: Sequence[int] | None = None,
        center_offset: float = 0.0,
    ):
        self.strides = [int(s) for s in strides]
        self.base_sizes = list(base_sizes) if base_sizes is not None else list(self.strides)
        if len(self.base_sizes) != len(self.strides):
            raise ValueError("base_sizes and strides need one entry per level")
        if scales is None:
            if octave_base_scale is None:
                raise ValueError("give either scales or octave_base_scale")
            scales = [2 ** (i / scales_per_octave) * octave_base_scale for i in range(scales_per_octave)]
        self.scales = torch.tensor(list(scales), dtype=torch.float32)
        self.ratios = torch.tensor(list(ratios), dtype=torch.float32)
        self.center_offset = center_offset
        self.base_anchors = [self._base_anchors(size) for size in self.base_sizes]

    @property
    def num_levels(self) -> int:
        return len(self.strides)

    @property
    def num_base_anchors(self) -> int:
        """Anchors per feature location (same on every level)."""
        return len(self.ratios) * len(self.scales)

    def _base_anchors(self, base_size: int) -> Tensor:
        """``(A, 4)`` xyxy anchors of one location at the origin, ratio-major."""
        h_ratios = torch.sqrt(self.ratios)
        w_ratios = 1 / h_ratios
        ws = (base_size * w_ratios[:, None] * self.scales[None, :]).reshape(-1)
        hs = (base_size * h_ratios[:, None] * self.scales[None, :]).reshape(-1)
        cx = self.center_offset * base_size
        cy = self.center_offset * base_size
        return torch.stack([cx - 0.5 * ws, cy - 0.5 * hs, cx + 0.5 * ws, cy + 0.5 * hs], dim=-1)

    def level_anchors(
        self, level: int, feat_size: Sequence[int], device: torch.device | None = None
    ) -> Tensor:
        """``(H * W * A, 4)`` xyxy anchors of one level, ordered ``(y, x, a)``."""
        height, width = int(feat_size[0]), int(feat_size[1])
        stride = self.strides[level]
        shift_x = torch.arange(width, device=device).float() * stride
        shift_y = torch.arange(height, device=device).float() * stride
        xx = shift_x.repeat(height)
        yy = shift_y.view(-1, 1).repeat(1, width).view(-1)
        shifts = torch.stack([xx, yy, xx, yy], dim=-1)
        return (self.base_anchors[level].to(device)[None] + shifts[:, None]).view(-1, 4)

    def grid_anchors(
        self, feat_sizes: Sequence[Sequence[int]], device: torch.device | None = None
    ) -> list[Tensor]:
        """Per level ``(H_l * W_l * A, 4)`` xyxy anchors."""
        return [self.level_anchors(lvl, size, device) for lvl, size in enumerate(feat_sizes)]

    def valid_flags(
        self,
        feat_sizes: Sequence[Sequence[int]],
        image_size: Sequence[int],
        device: torch.device | None = None,
    ) -> list[Tensor]:
        """Per level ``(H_l * W_l * A,)`` bool: the anchor's location lies inside the image's valid region.

        A location ``(y, x)`` of a level with stride ``s`` is valid when ``x < ceil(w / s)`` and
        ``y < ceil(h / s)`` with ``(h, w) = image_size`` (the reference's pad_shape with pad divisor 1).
        """
        img_h, img_w = int(image_size[0]), int(image_size[1])
        flags = []
        for level, (height, width) in enumerate(feat_sizes):
            stride = self.strides[level]
            valid_h = min(math.ceil(img_h / stride), int(height))
            valid_w = min(math.ceil(img_w / stride), int(width))
            ok_y = torch.arange(int(height), device=device) < valid_h
            ok_x = torch.arange(int(width), device=device) < valid_w
            ok = (ok_y[:, None] & ok_x[None, :]).reshape(-1)
            flags.append(ok[:, None].expand(-1, self.num_base_anchors).reshape(-1))
        return flags
