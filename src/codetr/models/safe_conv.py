"""``Conv2d`` that avoids a wrong bf16 weight gradient of strided convolutions over one-pixel-wide maps on the CPU.

On CPUs with native bf16 (AVX512-BF16), oneDNN's bf16 backward-weights kernel of a 3x3 (or 7x7) stride-2
convolution whose input is one column wide returns garbage: values read from uninitialised memory, from wrong by a
factor of a few to 1e36 and sometimes inf / NaN, different on every call (measured with torch 2.14 on AMD EPYC:
input ``(2, 64, h, 1)`` for h = 1, 2, 4, 5; the forward, the input gradient, stride-1 convolutions, 1x1 kernels and
maps at least two pixels wide are right; the same convolution in float32, or with oneDNN off, is right). CPUs
without native bf16 take another kernel and are not affected. On an Intel Xeon with AMX-BF16 (torch 2.14) the same
weight-gradient fault shows, and the FORWARD is wrong as well whenever the output is one column wide: NaN for
3x3 and 7x7 stride-2 convolutions with 256 channels on inputs ``(2, 256, h, w)``, w = 1 or 2, h >= 3 (measured;
16 and 64 channels stayed finite in that probe, 512 channels in the tiny model's neck did not).

The detector meets such maps wherever a stride-2 convolution reads the coarsest level of a small image: the
auxiliary pyramid's ``downsample`` (stride 64 -> 128), the neck's extra levels and, on images only a few pixels wide,
the ResNet's strided convolutions (its 7x7 stem measured wrong too; 1x1 stride 2 right, guarded all the same). On
the tiny CPU model the stride-64 map of a 64-pixel image is 1 x 1 at every step. Under ``bf16-mixed`` training this
made the weight gradient of ``query_head.downsample.0.weight`` wrong at every step and non-finite at some (the
non-finite step guard skipped them). :class:`SafeStridedConv2d` runs exactly that case in float32; the map is one
pixel wide, so the cost is nil.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _cpu_bf16(x: Tensor) -> bool:
    if x.device.type != "cpu":
        return False
    if x.dtype == torch.bfloat16:
        return True
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


class SafeStridedConv2d(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) that computes in float32 when it would otherwise run the
    broken case: CPU, bf16 (autocast or bf16 input), stride > 1, an input or output map one pixel wide or high
    (measured wrong: one wide; one high is guarded too, for the price of nothing). The output keeps the input's
    dtype. Everywhere else it is ``nn.Conv2d``."""

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output for an input of ``height x width``."""
        sizes = []
        for size, kernel, stride, pad, dilation in zip(
            (height, width), self.kernel_size, self.stride, self.padding, self.dilation
        ):
            sizes.append((size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
        return sizes[0], sizes[1]

    def forward(self, x: Tensor) -> Tensor:
        if max(self.stride) > 1 and _cpu_bf16(x) and min(*x.shape[-2:], *self.output_size(*x.shape[-2:])) == 1:
            bias = None if self.bias is None else self.bias.float()
            with torch.autocast("cpu", enabled=False):
                return self._conv_forward(x.float(), self.weight.float(), bias).to(x.dtype)
        return super().forward(x)
