"""Mask scoring (the reference's ``MaskIoUHead``, Mask Scoring R-CNN; docs/architecture.md#mask-branch): predicts,
per RoI and class, the IoU of the stage-1 mask with its ground truth. At inference the mask score is that IoU times
the box score. Parameter names follow the reference's checkpoints.

Written by hand: torchvision has no mask-IoU head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.heads.refine_mask_head import ConvNormReLU


class MaskIoUHead(nn.Module):
    """``forward(roi_feats (R, C, S, S), mask_logits (R, 2S, 2S))`` -> ``(R, K)`` IoU predictions (sigmoid when
    ``score_use_sigmoid``).

    Args:
        in_channels: RoI feature width ``C``. roi_size: ``S``. num_classes: K.
        num_convs: 3x3 conv + LN + ReLU blocks on (features, max-pooled mask probability), the last with stride 2.
        conv_channels / fc_channels / num_fcs: widths.
    """

    def __init__(self, in_channels: int, roi_size: int, num_classes: int, num_convs: int = 2, num_fcs: int = 1,
                 conv_channels: int = 256, fc_channels: int = 1024, score_use_sigmoid: bool = True):
        super().__init__()
        if roi_size % 2:
            # the stride-2 conv maps S to ceil(S / 2), the fc expects (S // 2)^2 positions (as the reference's)
            raise ValueError(f"mask IoU head: roi_size must be even (its last conv halves it), got {roi_size}; the "
                             "mask branch's first stage size (model.mask_stage_sizes[0]) sets it")
        self.roi_size, self.score_use_sigmoid = roi_size, score_use_sigmoid
        self.convs = nn.ModuleList(
            ConvNormReLU(in_channels + 1 if i == 0 else conv_channels, conv_channels,
                         stride=2 if i == num_convs - 1 else 1)
            for i in range(num_convs))
        pooled = (roi_size // 2) ** 2
        self.fcs = nn.ModuleList(
            nn.Linear(conv_channels * pooled if i == 0 else fc_channels, fc_channels) for i in range(num_fcs))
        self.fc_mask_iou = nn.Linear(fc_channels, num_classes)
        for fc in self.fcs:  # Caffe2 Xavier (uniform, gain 1), zero bias
            nn.init.kaiming_uniform_(fc.weight, a=1)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_mask_iou.weight, std=0.01)
        nn.init.zeros_(self.fc_mask_iou.bias)

    def forward(self, roi_feats: Tensor, mask_logits: Tensor) -> Tensor:
        pooled = F.max_pool2d(mask_logits.sigmoid().unsqueeze(1), 2, 2)
        x = torch.cat([roi_feats, pooled], dim=1)
        for conv in self.convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.fcs:
            x = F.relu(fc(x))
        iou = self.fc_mask_iou(x)
        return iou.sigmoid() if self.score_use_sigmoid else iou
