"""ResNet backbone (docs/architecture.md#resnet) built from torchvision's ``Bottleneck`` blocks,
with mmdet's ``base_channels``.

Key names are torchvision's (``conv1``, ``bn1``, ``layer{1..4}.{b}.conv{1,2,3}`` / ``bn{1,2,3}`` /
``downsample.{0,1}``), which are also mmdet's, so official ``backbone.*`` weights load unchanged, including the
``num_batches_tracked`` buffers. torchvision's own ``ResNet`` class fixes the stem at 64 channels, hence this small
assembly: ``base_channels=64`` is ResNet-50, ``base_channels=16`` the oracle's tiny variant (stem 16 channels,
stage widths 16/32/64/128, outputs 64/128/256/512 channels).

Normalisation follows the reference (``norm_cfg=BN(requires_grad=False)``, ``norm_eval=True``): every BatchNorm
has frozen affine parameters and stays in eval mode, so the running statistics are never updated.
``frozen_stages=1`` additionally freezes the stem and ``layer1`` (all parameters, eval mode).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck

from codetr.checkpoint_io import strip_prefix
from codetr.models.backbones.pretrained import load_pretrained
from codetr.models.safe_conv import SafeStridedConv2d

log = logging.getLogger(__name__)

STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class ResNet(nn.Module):
    """Bottleneck ResNet, ``style='pytorch'`` (stride on the 3x3 conv).

    Args:
        depth: 50, 101 or 152.
        base_channels: stem width and width of the first stage (64 for the standard ResNet).
        frozen_stages: number of frozen stages counted with the stem (-1: nothing, 0: stem, 1: stem + layer1, ...).
        norm_eval: keep every BatchNorm in eval mode (running statistics frozen) even in ``train()``.
        norm_requires_grad: whether BatchNorm affine parameters are trained (reference: False).
        out_indices: which stages (0..3 = C2..C5) are returned.
        weights: None (random init), a local file or a named source such as ``"torchvision://resnet50"``
            (:mod:`codetr.models.backbones.pretrained`); torchvision or mmdet naming, ``backbone.`` prefix and
            container dicts accepted. Loaded before freezing: frozen stages keep the pretrained values.

    Forward: ``images (B, 3, H, W)`` -> list of ``(B, C_i, H / s_i, W / s_i)`` with ``s_i = 4, 8, 16, 32`` and
    ``C_i = 4 * base_channels * 2**i`` (spatial sizes as the strided convs give them: ``ceil`` rounding).
    """

    def __init__(
        self,
        depth: int = 50,
        base_channels: int = 64,
        frozen_stages: int = 1,
        norm_eval: bool = True,
        norm_requires_grad: bool = False,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        weights: str | Path | None = None,
    ):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")
        if not set(out_indices) <= {0, 1, 2, 3}:
            raise ValueError(f"out_indices must be within 0..3, got {list(out_indices)}")
        self.depth, self.frozen_stages, self.norm_eval = depth, frozen_stages, norm_eval
        self.out_indices = tuple(out_indices)
        # strided convs are SafeStridedConv2d (nn.Conv2d with the same keys; float32 for one-pixel-wide maps under
        # bf16 on the CPU, see there): the coarse stages of very small images meet that case
        self.conv1 = SafeStridedConv2d(3, base_channels, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_ch = base_channels
        channels = []
        for i, blocks in enumerate(STAGE_BLOCKS[depth]):
            planes = base_channels * 2**i
            layer, in_ch = _make_stage(in_ch, planes, blocks, stride=1 if i == 0 else 2)
            self.add_module(f"layer{i + 1}", layer)
            channels.append(in_ch)
        self.out_channels = [channels[i] for i in self.out_indices]
        self._init_weights()
        if weights is not None:
            self.load_weights(weights)
        for module in self.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.requires_grad_(norm_requires_grad)
        for module in self._frozen_modules():
            module.requires_grad_(False)
        self.train()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _frozen_modules(self) -> list[nn.Module]:
        modules: list[nn.Module] = [self.conv1, self.bn1] if self.frozen_stages >= 0 else []
        modules += [getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)]
        return modules

    def train(self, mode: bool = True) -> ResNet:
        """Like ``nn.Module.train`` but frozen stages and (with ``norm_eval``) every BatchNorm stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def load_weights(self, weights: str | Path, weights_dir: str | Path | None = None) -> list[str]:
        """Load ImageNet / detector weights (see class docstring); returns the ignored source keys (the ImageNet
        classifier ``fc.*``). Raises ``KeyError`` naming the source for any other missing / unexpected key."""
        state, source = load_pretrained(weights, weights_dir)
        state = strip_prefix(state, "backbone.")
        ignored = [k for k in state if k.startswith("fc.")]
        state = {k: v for k, v in state.items() if k not in ignored}
        missing, unexpected = self.load_state_dict(state, strict=False)
        # torchvision ImageNet files carry no num_batches_tracked buffers: harmless (BN stays in eval mode).
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise KeyError(f"{source}: cannot load into ResNet-{self.depth}: missing {missing[:10]} "
                           f"({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
        log.info("loaded ResNet-%d weights from %s", self.depth, source)
        return ignored

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
            if i >= max(self.out_indices):
                break
        return outs


def _make_stage(in_ch: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    out_ch = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_ch != out_ch:
        downsample = nn.Sequential(
            SafeStridedConv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
        )
    first = Bottleneck(in_ch, planes, stride=stride, downsample=downsample)
    if stride != 1:  # torchvision's conv3x3 with the stride, as SafeStridedConv2d (same parameters and keys)
        first.conv2 = SafeStridedConv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
    layers = [first]
    layers += [Bottleneck(out_ch, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers), out_ch


__all__ = ["ResNet"]
