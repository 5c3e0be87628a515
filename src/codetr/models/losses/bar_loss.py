"""Boundary-aware refinement loss of the multi-stage mask head (the reference's ``BARCrossEntropyLoss``;
docs/architecture.md#mask-branch).

Stages up to ``start_stage``: mean binary cross-entropy over every pixel. Later stages: binary cross-entropy only in
the boundary region, the union of the band of ``boundary_width`` around the previous stage's binary prediction and
around the previous stage's target, upsampled to this stage (bilinear, >= 0.5), averaged over that region. The
"previous prediction" of a refined stage is itself refined as at inference (band width 1 outside which the coarser
logits are kept). The stage losses are summed with ``stage_weights``.

Written by hand: no library has this loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.mask_ops import boundary_band


class BARCrossEntropyLoss(nn.Module):
    def __init__(self, stage_weights: Sequence[float], boundary_width: int = 2, start_stage: int = 1):
        super().__init__()
        self.stage_weights, self.boundary_width, self.start_stage = list(stage_weights), boundary_width, start_stage

    def forward(self, stage_logits: Sequence[Tensor], stage_targets: Sequence[Tensor]) -> Tensor:
        """``stage_logits`` ``[(R, 1, s_i, s_i)]``, ``stage_targets`` ``[(R, s_i, s_i)]`` binary float -> scalar."""
        if len(stage_logits) != len(self.stage_weights):
            raise ValueError(f"{len(stage_logits)} mask stages but {len(self.stage_weights)} stage weights")
        total, previous = None, None
        for index, (logits, target) in enumerate(zip(stage_logits, stage_targets)):
            pred = logits.squeeze(1)
            if index <= self.start_stage:
                loss = F.binary_cross_entropy_with_logits(pred, target)
                previous = pred.sigmoid() >= 0.5
            else:
                size = pred.shape[-2:]
                region = (boundary_band(previous.float(), self.boundary_width) == 1) | (
                    boundary_band(stage_targets[index - 1].float(), self.boundary_width) == 1)
                region = F.interpolate(region.unsqueeze(1).float(), size, mode="bilinear", align_corners=True)
                region = (region >= 0.5).squeeze(1)
                per_pixel = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
                loss = per_pixel[region].sum() / region.sum().clamp(min=1).float()
                # the prediction the next stage refines: this stage inside the previous one's band (width 1)
                with torch.no_grad():
                    band = F.interpolate((boundary_band(previous.float(), 1) == 1).unsqueeze(1).float(), size,
                                         mode="bilinear", align_corners=True) >= 0.5
                    refined = F.interpolate(stage_logits[index - 1].detach(), size, mode="bilinear",
                                            align_corners=True)
                    refined[band] = logits.detach()[band]
                    previous = refined.squeeze(1).sigmoid() >= 0.5
            weighted = self.stage_weights[index] * loss
            total = weighted if total is None else total + weighted
        return total
