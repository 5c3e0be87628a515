"""Necks: ChannelMapper (docs/architecture.md#channel-mapper, R50 / Swin-L) and the simple feature pyramid SFP
(docs/architecture.md#vit-sfp, ViT-L).

Both return a list of ``(B, out_channels, H_l, W_l)`` maps, strides 4, 8, 16, 32, 64 for the 5-level setting.
Parameter names follow mmdet / the original repository so official ``neck.*`` weights load unchanged:
ChannelMapper ``convs.{i}.conv`` / ``convs.{i}.gn`` / ``extra_convs.{j}.conv`` / ``.gn``; SFP ``p{2..6}.{k}``
(positions inside each ``nn.Sequential``, the parameter-free upsample / activation / pool slots included).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import LayerNorm2d
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.models.safe_conv import SafeStridedConv2d


class ConvGN(nn.Module):
    """Bias-free ``Conv2d`` followed by ``GroupNorm``, no activation (mmcv ``ConvModule(act_cfg=None)``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, num_groups: int):
        super().__init__()
        # strided on the extra levels: see SafeStridedConv2d (bf16 on CPUs with native bf16)
        self.conv = SafeStridedConv2d(in_channels, out_channels, kernel_size, stride, padding=kernel_size // 2,
                                      bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.gn(self.conv(x))


class ChannelMapper(nn.Module):
    """Maps each backbone level to ``out_channels`` (1x1 conv + GN) and adds extra levels by 3x3 stride-2 conv + GN.

    The first extra level is computed from the **raw** last backbone map (e.g. C5 with 2048 channels), further
    extra levels (``num_outs > len(in_channels) + 1``) from the previous extra level, as in mmdet.

    Args:
        in_channels: channels of the backbone maps, e.g. ``[256, 512, 1024, 2048]``.
        out_channels: common width (the transformer's embed dims).
        num_outs: number of output levels (>= ``len(in_channels)``).
        num_groups: GroupNorm groups.
        kernel_size: kernel of the per-level mapping convs (reference 1).
        skip_finest: number of finest backbone maps left unused, with their outputs: the pyramid keeps the strides
            of the other levels and has ``num_outs - skip_finest`` maps (Co-Deformable-DETR: 1, i.e. C3..C5 + one
            extra level = strides 8..64, from a backbone configured with C2..C5 for the 5-level Co-DINO). Module
            names count from the first used map (``convs.0`` maps C3 then), as in the reference's 4-level config.
    Forward: list of ``(B, in_channels[i], H_i, W_i)`` -> list of ``num_outs - skip_finest`` maps
    ``(B, out_channels, ., .)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        out_channels: int = 256,
        num_outs: int = 5,
        num_groups: int = 32,
        kernel_size: int = 1,
        skip_finest: int = 0,
    ):
        super().__init__()
        if not 0 <= skip_finest < len(in_channels):
            raise ValueError(
                f"skip_finest={skip_finest} must be in [0, {len(in_channels)}) for in_channels {in_channels}"
            )
        self.skip_finest = skip_finest
        in_channels, num_outs = list(in_channels)[skip_finest:], num_outs - skip_finest
        if num_outs < len(in_channels):
            raise ValueError(f"num_outs={num_outs} < number of inputs {len(in_channels)}")
        self.in_channels, self.num_outs = in_channels, num_outs
        self.convs = nn.ModuleList(ConvGN(c, out_channels, kernel_size, 1, num_groups) for c in in_channels)
        extra_in = [in_channels[-1]] + [out_channels] * (num_outs - len(in_channels) - 1)
        self.extra_convs = nn.ModuleList(
            ConvGN(c, out_channels, 3, 2, num_groups) for c in extra_in[: num_outs - len(in_channels)]
        )
        self.out_channels = [out_channels] * num_outs
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform convs, GroupNorm weight 1 / bias 0 (reference init)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != len(self.convs) + self.skip_finest:
            raise ValueError(f"ChannelMapper expects {len(self.convs) + self.skip_finest} maps, got {len(feats)}")
        feats = feats[self.skip_finest :]
        outs = [conv(x) for conv, x in zip(self.convs, feats)]
        x = feats[-1]
        for extra in self.extra_convs:
            x = extra(x)
            outs.append(x)
        return outs


def _conv(cin: int, cout: int, k: int, stride: int = 1) -> nn.Conv2d:
    return SafeStridedConv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)


class SFP(nn.Module):
    """Simple feature pyramid from one stride-16 ViT map (docs/architecture.md#vit-sfp).

    "LN" is a channel-wise LayerNorm at every pixel (eps 1e-6, timm ``LayerNorm2d``), GELU activations, nearest x2
    upsampling, 3x3/s2/p1 max-pooling, every conv bias-free:

    * ``p2`` (stride 4): Up, 3x3 C->C/2, LN, GELU, Up, 3x3 C/2->C/4, LN, GELU, 1x1 ->out, LN, GELU, 3x3, LN
    * ``p3`` (stride 8): Up, 3x3 C->C/2, LN, GELU, 1x1 ->out, LN, GELU, 3x3, LN
    * ``p4`` (stride 16): 1x1 C->out, LN, GELU, 3x3, LN
    * ``p5`` (stride 32): MaxPool, 1x1 C->out, LN, GELU, 3x3, LN
    * ``p6`` (stride 64): MaxPool, 3x3/s2 C->C, LN, GELU, 1x1 ->out, LN, GELU, 3x3, LN

    Args:
        in_channels: ViT width ``C`` (an int or a one-element list, as in the original config).
        out_channels: output width.
        num_outs: 5 with ``use_p2`` (strides 4..64), 4 without (strides 8..64).
        use_p2: build the stride-4 level.
        with_cp: activation checkpointing of each branch (no numerical effect).
        num_groups: unused (SFP normalises with LayerNorm); accepted so that the neck config group can share the
            ChannelMapper's arguments.
    Forward: ``[x (B, C, H, W)]`` -> list of ``(B, out_channels, 4H, 4W)``, ``(2H, 2W)``, ``(H, W)``,
    ``(ceil(H/2), .)``, ``(ceil(ceil(H/2)/2), .)``.
    """

    def __init__(
        self,
        in_channels: int | Sequence[int] = 1024,
        out_channels: int = 256,
        num_outs: int = 5,
        use_p2: bool = True,
        with_cp: bool = False,
        num_groups: int | None = None,
    ):
        super().__init__()
        c = in_channels if isinstance(in_channels, int) else int(next(iter(in_channels)))
        if num_outs != 4 + int(use_p2):
            raise ValueError(f"SFP gives {4 + int(use_p2)} levels with use_p2={use_p2}, num_outs={num_outs}")
        o = out_channels
        self.use_p2, self.with_cp = use_p2, with_cp

        def ln(ch: int) -> nn.Module:
            return LayerNorm2d(ch, eps=1e-6)

        def up() -> nn.Module:
            return nn.Upsample(scale_factor=2.0, mode="nearest")

        def pool() -> nn.Module:
            return nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        if use_p2:
            self.p2 = nn.Sequential(up(), _conv(c, c // 2, 3), ln(c // 2), nn.GELU(), up(), _conv(c // 2, c // 4, 3),
                                    ln(c // 4), nn.GELU(), _conv(c // 4, o, 1), ln(o), nn.GELU(), _conv(o, o, 3), ln(o))
        self.p3 = nn.Sequential(up(), _conv(c, c // 2, 3), ln(c // 2), nn.GELU(), _conv(c // 2, o, 1), ln(o),
                                nn.GELU(), _conv(o, o, 3), ln(o))
        self.p4 = nn.Sequential(_conv(c, o, 1), ln(o), nn.GELU(), _conv(o, o, 3), ln(o))
        self.p5 = nn.Sequential(pool(), _conv(c, o, 1), ln(o), nn.GELU(), _conv(o, o, 3), ln(o))
        self.p6 = nn.Sequential(pool(), _conv(c, c, 3, stride=2), ln(c), nn.GELU(), _conv(c, o, 1), ln(o), nn.GELU(),
                                _conv(o, o, 3), ln(o))
        self.out_channels = [o] * num_outs
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform convs; LayerNorm weight 1 / bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _run(self, branch: nn.Module, x: Tensor) -> Tensor:
        if self.with_cp and self.training and torch.is_grad_enabled():
            return checkpoint(branch, x, use_reentrant=False)
        return branch(x)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != 1:
            raise ValueError(f"SFP expects the single stride-16 ViT map, got {len(feats)} maps")
        x = feats[0]
        outs = [self._run(getattr(self, f"p{i}"), x) for i in (3, 4, 5, 6)]
        if self.use_p2:
            outs.insert(0, self._run(self.p2, x))
        return outs
