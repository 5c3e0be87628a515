"""Multi-level RoI feature extraction, shared by the Faster R-CNN box head and the mask branch
(docs/architecture.md#roi-head; the reference's ``SingleRoIExtractor`` with an aligned ``RoIAlign``).

A RoI of size ``w x h`` (xyxy, no +1) reads level ``clamp(floor(log2(sqrt(w * h) / finest_scale + 1e-6)), 0, L - 1)``
of the first ``L = len(strides)`` pyramid maps; the features come from ``torchvision.ops.roi_align`` (``aligned=True``,
``sampling_ratio`` 0 = adaptive, average pooling), identical to mmcv's RoIAlign per the oracles' op checks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align


class MultiLevelRoIExtractor(nn.Module):
    """``forward(feats, rois)``: feats per level ``(B, C, H_l, W_l)``, rois ``(R, 5)`` = (batch index, x1, y1, x2, y2)
    in input pixels -> ``(R, C, S, S)`` with ``S = output_size``. No parameters."""

    def __init__(self, strides: Sequence[int], output_size: int, sampling_ratio: int = 0, finest_scale: float = 56):
        super().__init__()
        self.strides, self.output_size = [int(s) for s in strides], int(output_size)
        self.sampling_ratio, self.finest_scale = int(sampling_ratio), float(finest_scale)

    @property
    def num_inputs(self) -> int:
        return len(self.strides)

    def extra_repr(self) -> str:
        return f"strides={self.strides}, output_size={self.output_size}, finest_scale={self.finest_scale}"

    def levels(self, boxes: Tensor) -> Tensor:
        """``(R, 4)`` xyxy -> ``(R,)`` pyramid level index by RoI scale."""
        scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
        levels = torch.floor(torch.log2(scale / self.finest_scale + 1e-6))
        return levels.clamp(min=0, max=len(self.strides) - 1).long()

    def forward(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        size = self.output_size
        out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], size, size)
        if len(self.strides) == 1:  # the reference skips the level mapping for one level
            return roi_align(feats[0], rois.to(feats[0].dtype), size, 1.0 / self.strides[0], self.sampling_ratio,
                             aligned=True)
        levels = self.levels(rois[:, 1:])
        if torch.compiler.is_exporting():  # fixed shapes: every level for every RoI, each RoI's own level kept
            for level, stride in enumerate(self.strides):
                pooled = roi_align(feats[level], rois.to(feats[level].dtype), size, 1.0 / stride, self.sampling_ratio,
                                   aligned=True).to(out.dtype)
                out = torch.where((levels == level).view(-1, 1, 1, 1), pooled, out)
            return out
        for level, stride in enumerate(self.strides):
            inds = torch.nonzero(levels == level).view(-1)
            if len(inds):
                out[inds] = roi_align(
                    feats[level], rois[inds].to(feats[level].dtype), size, 1.0 / stride, self.sampling_ratio,
                    aligned=True,
                ).to(out.dtype)
        return out


def rois_from_boxes(boxes: Sequence[Tensor]) -> Tensor:
    """Per image ``(N_i, 4)`` boxes -> ``(sum N_i, 5)`` RoIs with the image index first (mmdet ``bbox2roi``)."""
    return torch.cat([torch.cat([b.new_full((len(b), 1), i), b[:, :4]], 1) for i, b in enumerate(boxes)]) \
        if len(boxes) else torch.zeros(0, 5)
