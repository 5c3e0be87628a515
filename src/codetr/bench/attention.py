"""Multi-scale deformable attention at the encoder's real shapes: each implementation, forward and
forward+backward."""

from __future__ import annotations

import importlib.util

import torch

from codetr.bench.timing import Measurement, measure
from codetr.models.transformer.ms_deform_attn import multi_scale_deformable_attention
from codetr.models.transformer.ms_deform_attn_cpu import (
    cpu_kernel_available,
    multi_scale_deformable_attention_cpu,
)


def encoder_shapes(image_size: int, strides=(4, 8, 16, 32, 64)) -> list[tuple[int, int]]:
    return [(-(-image_size // s), -(-image_size // s)) for s in strides]


def run(image_size: int = 512, device: str = "cpu", repeats: int = 3, heads: int = 8, dims: int = 32, points: int = 4):
    device = torch.device(device)
    shapes = encoder_shapes(image_size)
    tokens = sum(h * w for h, w in shapes)
    torch.manual_seed(0)
    value = torch.randn(1, tokens, heads, dims, device=device, requires_grad=True)
    locations = torch.rand(1, tokens, heads, len(shapes), points, 2, device=device).requires_grad_()
    weights = torch.rand(1, tokens, heads, len(shapes), points, device=device).softmax(-1).requires_grad_()
    impls = {"pytorch": multi_scale_deformable_attention}
    if device.type == "cpu" and cpu_kernel_available():
        impls["cpu_kernel"] = multi_scale_deformable_attention_cpu
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from codetr.models.transformer.ms_deform_attn_triton import multi_scale_deformable_attention_triton

        impls["triton"] = multi_scale_deformable_attention_triton
    rows: list[Measurement] = []
    params = {"image_size": image_size, "tokens": tokens, "heads": heads, "points": points, "device": device.type}
    for name, fn in impls.items():
        with torch.no_grad():
            rows.append(measure(f"msda {name} fwd", lambda fn=fn: fn(value, shapes, locations, weights),
                                {**params, "impl": name}, device, repeats))
        rows.append(measure(f"msda {name} fwd+bwd",
                            lambda fn=fn: fn(value, shapes, locations, weights).sum().backward(),
                            {**params, "impl": name}, device, repeats))
    return rows
