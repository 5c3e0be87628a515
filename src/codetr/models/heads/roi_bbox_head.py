"""Box head of the Faster R-CNN RoI branch: shared convs, shared fcs, a classifier and a box regressor.

One class covers the two heads Co-DINO recipes use (mmdet's ``ConvFCBBoxHead`` family; written here because
no maintained library ships it outside mmdet):

* mmdet's ``Shared2FCBBoxHead`` (the defaults; R50 / Swin-L recipes, docs/architecture.md#roi-head): no convs,
  2 fcs, class-specific regression;
* the ViT-L COCO head (docs/architecture.md#data, ViT-L row): 4 shared 3x3 convs, each conv -> GroupNorm(32) -> ReLU
  (the convs have no bias: the norm follows), 1 fc, class-agnostic regression.

State-dict keys follow mmdet so official checkpoints load without renaming: ``shared_convs.{i}.conv.weight``,
``shared_convs.{i}.gn.{weight,bias}``, ``shared_fcs.{j}.{weight,bias}``, ``fc_cls``, ``fc_reg``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ConvNormReLU(nn.Module):
    """3x3 conv (no bias) -> GroupNorm -> ReLU; keys ``conv.weight``, ``gn.weight``, ``gn.bias``.

    Init as mmcv's ConvModule: Kaiming-normal (fan_out, ReLU) conv weight, norm weight 1 and bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class ConvFCBBoxHead(nn.Module):
    """``(R, C, S, S)`` RoI features -> class logits ``(R, K + 1)`` (softmax, background last) and box deltas.

    Deltas are ``(R, 4)`` with ``reg_class_agnostic`` and ``(R, 4K)`` otherwise (columns 4c..4c+3 = class c),
    encoded against the RoI by the branch's ``DeltaXYWHBoxCoder``.

    Args:
        in_channels: C of the RoI features. roi_size: S. num_classes: K.
        num_shared_convs: 3x3 conv + GN + ReLU blocks before the fcs (0 for Shared2FC, 4 for ViT-L).
        conv_channels: width of those convs. norm_groups: GroupNorm groups.
        num_shared_fcs: fc + ReLU layers on the flattened features. fc_channels: their width.
        reg_class_agnostic: one box per RoI instead of one per class.
    Init: shared fcs Xavier-uniform, ``fc_cls`` N(0, 0.01), ``fc_reg`` N(0, 0.001), biases 0.
    """

    def __init__(
        self,
        in_channels: int = 256,
        roi_size: int = 7,
        fc_channels: int = 1024,
        num_classes: int = 80,
        num_shared_convs: int = 0,
        conv_channels: int = 256,
        norm_groups: int = 32,
        num_shared_fcs: int = 2,
        reg_class_agnostic: bool = False,
    ):
        super().__init__()
        if num_shared_fcs < 1:
            raise ValueError(f"num_shared_fcs must be >= 1, got {num_shared_fcs}")
        self.num_classes, self.reg_class_agnostic = num_classes, reg_class_agnostic
        widths = [in_channels] + [conv_channels] * num_shared_convs
        self.shared_convs = nn.ModuleList(
            [ConvNormReLU(widths[i], widths[i + 1], norm_groups) for i in range(num_shared_convs)]
        )
        flat = widths[-1] * roi_size * roi_size
        self.shared_fcs = nn.ModuleList(
            [nn.Linear(flat if j == 0 else fc_channels, fc_channels) for j in range(num_shared_fcs)]
        )
        self.fc_cls = nn.Linear(fc_channels, num_classes + 1)
        self.fc_reg = nn.Linear(fc_channels, 4 if reg_class_agnostic else 4 * num_classes)
        for fc in self.shared_fcs:
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.normal_(self.fc_cls.weight, std=0.01)
        nn.init.normal_(self.fc_reg.weight, std=0.001)
        nn.init.zeros_(self.fc_cls.bias)
        nn.init.zeros_(self.fc_reg.bias)

    def forward(self, roi_feats: Tensor) -> tuple[Tensor, Tensor]:
        x = roi_feats
        for conv in self.shared_convs:
            x = conv(x)
        x = x.flatten(1)
        for fc in self.shared_fcs:
            x = F.relu(fc(x))
        return self.fc_cls(x), self.fc_reg(x)

    def class_deltas(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """``(R, 4)`` deltas of class ``labels[r]`` for each row (the only box when class-agnostic)."""
        if self.reg_class_agnostic:
            return deltas
        return deltas.view(len(deltas), self.num_classes, 4)[torch.arange(len(deltas), device=deltas.device), labels]

    def all_class_deltas(self, deltas: Tensor) -> Tensor:
        """``(R, K, 4)`` one delta per class (the class-agnostic box repeated K times)."""
        if self.reg_class_agnostic:
            return deltas[:, None, :].expand(len(deltas), self.num_classes, 4)
        return deltas.view(len(deltas), self.num_classes, 4)

