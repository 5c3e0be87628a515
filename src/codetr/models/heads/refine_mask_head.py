"""The mask head of Co-DINO-Inst: a RefineMask-style multi-stage head with a semantic branch (the reference's
``SimpleRefineMaskHead``; docs/architecture.md#mask-branch). Parameter names follow its checkpoints.

Input: RoI features ``(R, C, S0, S0)`` (``S0`` = the first stage size), the stride-4 pyramid map ``(B, C, H/4, W/4)``
(semantic features) and the RoIs ``(R, 5)`` with their labels. Stage ``i`` predicts a one-class mask logit map at
``stage_sizes[i]`` (the class chosen by the label; the last stage is class-agnostic when it has one class), fuses it
with the instance features and RoI-aligned semantic features, and doubles the resolution; the last stage's logits
are bilinearly upsampled x2 (``pre_upsample_last_stage=False``). Channels halve from stage to stage.

Written by hand: no library has this head.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from codetr.models.layer_norm import ChannelLayerNorm


class ConvNormReLU(nn.Module):
    """3x3 conv (no bias) -> channel LayerNorm -> ReLU; mmcv ``ConvModule`` with ``LN2d`` (keys ``conv``,
    ``norm_layer``). eps 1e-5: mmcv's ``build_norm_layer`` sets it for every norm it builds (``LN2d``'s own default,
    1e-6, never applies there)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm_layer = ChannelLayerNorm(out_channels, eps=1e-5)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.norm_layer(self.conv(x)))


class ConvAct(nn.Module):
    """Conv with bias, optional ReLU (mmcv ``ConvModule`` without norm; key ``conv``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, dilation: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, padding=dilation * (kernel // 2), dilation=dilation)
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        return F.relu(x) if self.relu else x


class MultiBranchFusionAvg(nn.Module):
    """Three dilated 3x3 conv branches (+ ReLU) and the global average, summed, then a 1x1 merge conv."""

    def __init__(self, channels: int, dilations: Sequence[int] = (1, 3, 5)):
        super().__init__()
        if len(dilations) != 3:
            raise ValueError(f"the fusion has three dilated branches, got dilations {list(dilations)}")
        for index, dilation in enumerate(dilations):
            self.add_module(f"dilation_conv_{index + 1}", ConvAct(channels, channels, 3, dilation))
        self.merge_conv = ConvAct(channels, channels, 1, relu=False)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.avg_pool2d(x, x.shape[-1])  # RoI maps are square: the global average, as the reference pools it
        return self.merge_conv(self.dilation_conv_1(x) + self.dilation_conv_2(x) + self.dilation_conv_3(x) + pooled)


class RefineStage(nn.Module):
    """One refinement stage (``SimpleSFMStage``): ``(R, c, s, s)`` features + ``(R, 1, s, s)`` logits ->
    ``(R, c / 2, 2s, 2s)`` (or ``s`` without the upsampling)."""

    def __init__(self, semantic_in: int, channels: int, out_channels: int, out_size: int, semantic_stride: int,
                 dilations: Sequence[int]):
        super().__init__()
        self.out_size, self.semantic_stride = out_size, semantic_stride
        self.semantic_transform_in = nn.Conv2d(semantic_in, channels, 1)
        self.fuse_conv = nn.ModuleList([nn.Conv2d(2 * channels + 1, channels, 1),
                                        MultiBranchFusionAvg(channels, dilations)])
        self.fuse_transform_out = nn.Conv2d(channels, out_channels - 1, 1)
        for conv in (self.semantic_transform_in, self.fuse_transform_out, self.fuse_conv[0]):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Tensor, logits: Tensor, semantic: Tensor, rois: Tensor, upsample: bool) -> Tensor:
        semantic = F.relu(self.semantic_transform_in(semantic))
        roi_semantic = roi_align(semantic, rois.to(semantic.dtype), self.out_size, 1.0 / self.semantic_stride, 0,
                                 aligned=True)
        probs = logits.sigmoid()
        fused = torch.cat([feats, roi_semantic, probs], dim=1)
        for conv in self.fuse_conv:
            fused = F.relu(conv(fused))
        fused = torch.cat([F.relu(self.fuse_transform_out(fused)), probs], dim=1)
        return F.interpolate(fused, scale_factor=2.0, mode="bilinear", align_corners=False) if upsample else fused


class SimpleRefineMaskHead(nn.Module):
    """Multi-stage mask head (module docstring).

    Args:
        in_channels: pyramid width ``C``. channels: width after the first convs (halved every stage).
        num_instance_convs / num_semantic_convs: 3x3 conv + LN + ReLU blocks before the stages.
        stage_sizes: output size of every stage's logits (reference 14, 28, 56, 112; the first equals the RoI
            feature size).
        stage_num_classes: classes of every stage's classifier (reference K, K, K, 1: class-agnostic last stage).
        semantic_stride: stride of the semantic map (4). dilations: of the fusion branches (1, 3, 5).
        pre_upsample_last_stage: upsample the last stage's features before its classifier instead of its logits.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        stage_sizes: Sequence[int],
        stage_num_classes: Sequence[int],
        num_instance_convs: int = 1,
        num_semantic_convs: int = 2,
        semantic_stride: int = 4,
        dilations: Sequence[int] = (1, 3, 5),
        pre_upsample_last_stage: bool = False,
    ):
        super().__init__()
        if len(stage_sizes) < 2 or len(stage_sizes) != len(stage_num_classes):
            raise ValueError(f"stage_sizes {list(stage_sizes)} and stage_num_classes {list(stage_num_classes)} need "
                             "one entry per stage, at least two stages")
        for size, following in itertools.pairwise(stage_sizes):
            if following != 2 * size:
                raise ValueError(f"every stage doubles the resolution: stage_sizes {list(stage_sizes)}")
        self.stage_sizes, self.stage_num_classes = list(stage_sizes), list(stage_num_classes)
        self.pre_upsample_last_stage = pre_upsample_last_stage
        self.instance_convs = nn.ModuleList(
            ConvNormReLU(in_channels if i == 0 else channels, channels) for i in range(num_instance_convs))
        self.semantic_convs = nn.ModuleList(
            ConvNormReLU(in_channels if i == 0 else channels, channels) for i in range(num_semantic_convs))
        widths = [channels]
        self.stages = nn.ModuleList()
        for size in self.stage_sizes[:-1]:
            width = widths[-1]
            self.stages.append(RefineStage(channels, width, width // 2, size, semantic_stride, dilations))
            widths.append(width // 2)
        self.stage_instance_logits = nn.ModuleList(
            nn.Conv2d(width, classes, 1) for width, classes in zip(widths, self.stage_num_classes))
        for conv in self.stage_instance_logits:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)

    @property
    def roi_size(self) -> int:
        return self.stage_sizes[0]

    def forward(self, roi_feats: Tensor, semantic: Tensor, rois: Tensor, labels: Tensor) -> tuple[list[Tensor], Tensor]:
        """Per-stage logits ``[(R, 1, s_i, s_i)]`` and a zero-valued term that keeps every parameter in the graph
        when there is no RoI (DDP needs it; the reference adds ``0 * sum`` of its hidden states)."""
        feats = roi_feats
        for conv in self.instance_convs:
            feats = conv(feats)
        for conv in self.semantic_convs:
            semantic = conv(semantic)
        rows = torch.arange(rois.shape[0], device=rois.device)  # shape, not len(): export keeps it symbolic
        stage_logits, keep_in_graph = [], feats.sum() * 0 + semantic.sum() * 0
        for index, stage in enumerate(self.stages):
            logits = self.stage_instance_logits[index](feats)[rows, labels][:, None]
            upsample = self.pre_upsample_last_stage or index < len(self.stages) - 1
            feats = stage(feats, logits, semantic, rois, upsample)
            stage_logits.append(logits)
        last_labels = labels.clamp(max=0) if self.stage_num_classes[-1] == 1 else labels
        logits = self.stage_instance_logits[-1](feats)[rows, last_labels][:, None]
        if not self.pre_upsample_last_stage:
            logits = F.interpolate(logits, scale_factor=2.0, mode="bilinear", align_corners=True)
        stage_logits.append(logits)
        return stage_logits, keep_in_graph
