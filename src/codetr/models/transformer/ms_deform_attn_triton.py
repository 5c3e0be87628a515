"""Multi-scale deformable attention as Triton kernels (forward and backward), written for codetr: neither Triton
nor torchvision ships this op.

Same contract and semantics as :func:`codetr.models.transformer.ms_deform_attn.multi_scale_deformable_attention`
(bilinear sampling with ``grid_sample``'s ``align_corners=False`` / zero padding, weighted by the attention weights).
Inputs may be fp32, fp16 or bf16; sampling weights and sums are accumulated in fp32. One program handles a block
of queries of one (batch, head) pair; the backward recomputes the corners and scatters the value gradient with fp32
atomics (so it is not bitwise deterministic on a GPU, like the official CUDA kernel).

Selected with ``attention_impl: triton``. Opt-in: tested for equality with the exact path in Triton's interpreter
on the CPU (``TRITON_INTERPRET=1``) and compiled to an sm_90 cubin without a GPU, but it has not yet run on a GPU
in this project's sessions, so ``auto`` keeps the exact path on CUDA until it has.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_QUERIES = 32


@triton.jit
def _program_block(H, Q, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's batch ``b``, head ``m``, query block ``q`` and channel lanes ``d`` (with their masks)."""
    bh = tl.program_id(1)
    q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    d = tl.arange(0, BLOCK_D)
    return bh // H, bh % H, q, d, q < Q, d < D


@triton.jit
def _level(shapes, starts, l):
    """Height, width and first flat token of level ``l``."""
    return (
        tl.load(shapes + 2 * l).to(tl.int32),
        tl.load(shapes + 2 * l + 1).to(tl.int32),
        tl.load(starts + l).to(tl.int32),
    )


@triton.jit
def _sample(loc, attn, b, q, q_ok, H, m, Q, L: tl.constexpr, P: tl.constexpr, l, p: tl.constexpr):
    """Flat sample index ``s`` (into ``(B, Q, H, L, P)``) of point ``p`` at level ``l`` for queries ``q`` of
    (batch ``b``, head ``m``), with its normalised location ``(lx, ly)`` and attention weight ``a`` in fp32."""
    s = (((b * Q + q).to(tl.int64) * H + m) * L + l) * P + p
    lx = tl.load(loc + 2 * s, mask=q_ok, other=0.0).to(tl.float32)
    ly = tl.load(loc + 2 * s + 1, mask=q_ok, other=0.0).to(tl.float32)
    a = tl.load(attn + s, mask=q_ok, other=0.0).to(tl.float32)
    return s, lx, ly, a


@triton.jit
def _corner(lx, ly, h, w, start, corner: tl.constexpr):
    """Flat token index, bilinear weight, inside-mask and the weight's derivatives by the fractional offsets
    ``(fx, fy)`` of one of the 4 corners (0: x0y0, 1: x1y0, 2: x0y1, 3: x1y1) of normalised locations
    ``(lx, ly)`` on an ``h`` x ``w`` level starting at token ``start``."""
    x = lx * w - 0.5
    y = ly * h - 0.5
    x0f = tl.floor(x)
    y0f = tl.floor(y)
    fx = x - x0f
    fy = y - y0f
    cx = x0f.to(tl.int32) + (corner % 2)
    cy = y0f.to(tl.int32) + (corner // 2)
    wx = fx if corner % 2 == 1 else 1.0 - fx
    wy = fy if corner // 2 == 1 else 1.0 - fy
    sx = 1.0 if corner % 2 == 1 else -1.0
    sy = 1.0 if corner // 2 == 1 else -1.0
    inside = (cx >= 0) & (cx < w) & (cy >= 0) & (cy < h)
    return start + cy * w + cx, wx * wy, inside, sx * wy, sy * wx


@triton.jit
def _forward_kernel(value, shapes, starts, loc, attn, out, N, H, Q,
                    L: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    b, m, q, d, q_ok, d_ok = _program_block(H, Q, D, BLOCK_Q, BLOCK_D)
    acc = tl.zeros((BLOCK_Q, BLOCK_D), dtype=tl.float32)
    for l in range(L):  # a runtime loop: unrolling levels x points x corners made 2 MB of PTX
        h, w, start = _level(shapes, starts, l)
        for p in tl.static_range(P):
            _, lx, ly, a = _sample(loc, attn, b, q, q_ok, H, m, Q, L, P, l, p)
            for corner in tl.static_range(4):
                index, weight, inside, _, _ = _corner(lx, ly, h, w, start, corner)
                rows = ((b * N + index).to(tl.int64) * H + m) * D
                ok = (inside & q_ok)[:, None] & d_ok[None, :]
                v = tl.load(value + rows[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)
                acc += (a * weight)[:, None] * v
    rows = ((b * Q + q).to(tl.int64) * H + m) * D
    tl.store(out + rows[:, None] + d[None, :], acc.to(out.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])


@triton.jit
def _backward_kernel(grad_out, value, shapes, starts, loc, attn, grad_value, grad_loc, grad_attn, N, H, Q,
                     L: tl.constexpr, P: tl.constexpr, D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    b, m, q, d, q_ok, d_ok = _program_block(H, Q, D, BLOCK_Q, BLOCK_D)
    out_rows = ((b * Q + q).to(tl.int64) * H + m) * D
    g = tl.load(grad_out + out_rows[:, None] + d[None, :], mask=q_ok[:, None] & d_ok[None, :], other=0.0)
    g = g.to(tl.float32)
    for l in range(L):  # a runtime loop: unrolling levels x points x corners made 2 MB of PTX
        h, w, start = _level(shapes, starts, l)
        for p in tl.static_range(P):
            s, lx, ly, a = _sample(loc, attn, b, q, q_ok, H, m, Q, L, P, l, p)
            d_attn = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            d_fx = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            d_fy = tl.zeros((BLOCK_Q,), dtype=tl.float32)
            for corner in tl.static_range(4):
                index, weight, inside, dweight_dfx, dweight_dfy = _corner(lx, ly, h, w, start, corner)
                rows = ((b * N + index).to(tl.int64) * H + m) * D
                ok = (inside & q_ok)[:, None] & d_ok[None, :]
                v = tl.load(value + rows[:, None] + d[None, :], mask=ok, other=0.0).to(tl.float32)
                tl.atomic_add(grad_value + rows[:, None] + d[None, :], (a * weight)[:, None] * g, mask=ok)
                dot = tl.sum(g * v, axis=1)  # <grad_out, value at this corner>
                d_attn += weight * dot
                d_fx += dweight_dfx * dot
                d_fy += dweight_dfy * dot
            tl.store(grad_attn + s, d_attn, mask=q_ok)
            # x = lx * w - 0.5, so d/d(lx) = w * d/d(fx); likewise for y
            tl.store(grad_loc + 2 * s, a * d_fx * w, mask=q_ok)
            tl.store(grad_loc + 2 * s + 1, a * d_fy * h, mask=q_ok)


def _launch_geometry(value: Tensor, locations: Tensor):
    batch, tokens, heads, dims = value.shape
    _, queries, _, levels, points, _ = locations.shape
    grid = (triton.cdiv(queries, BLOCK_QUERIES), batch * heads)
    constants = {"L": levels, "P": points, "D": dims, "BLOCK_Q": BLOCK_QUERIES, "BLOCK_D": triton.next_power_of_2(dims)}
    return (tokens, heads, queries), constants, grid


class _DeformableAttentionTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, value: Tensor, shapes: Tensor, starts: Tensor, locations: Tensor, weights: Tensor) -> Tensor:
        value, locations, weights = value.contiguous(), locations.contiguous(), weights.contiguous()
        sizes, constants, grid = _launch_geometry(value, locations)
        out = value.new_empty(value.shape[0], locations.shape[1], value.shape[2], value.shape[3])
        _forward_kernel[grid](value, shapes, starts, locations, weights, out, *sizes, **constants)
        ctx.save_for_backward(value, shapes, starts, locations, weights)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        value, shapes, starts, locations, weights = ctx.saved_tensors
        sizes, constants, grid = _launch_geometry(value, locations)
        grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)  # fp32 atomics
        grad_locations = torch.empty(locations.shape, dtype=torch.float32, device=value.device)
        grad_weights = torch.empty(weights.shape, dtype=torch.float32, device=value.device)
        _backward_kernel[grid](grad_out.contiguous(), value, shapes, starts, locations, weights, grad_value,
                               grad_locations, grad_weights, *sizes, **constants)
        return (grad_value.to(value.dtype), None, None, grad_locations.to(locations.dtype),
                grad_weights.to(weights.dtype))


def multi_scale_deformable_attention_triton(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """value ``(B, N, H, D)``, locations ``(B, Q, H, L, P, 2)`` normalised ``(x, y)``, weights ``(B, Q, H, L, P)``
    -> ``(B, Q, H*D)``."""
    if value.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"attention_impl='triton' needs CUDA tensors (got {value.device}; on the CPU it runs only in Triton's "
            "interpreter, TRITON_INTERPRET=1, for testing): use attention_impl=auto or cpu_kernel there"
        )
    shape_tensor = torch.tensor(shapes, dtype=torch.int32, device=value.device)
    starts = torch.zeros(len(shapes), dtype=torch.int32, device=value.device)
    starts[1:] = (shape_tensor[:, 0] * shape_tensor[:, 1]).cumsum(0)[:-1]
    out = _DeformableAttentionTriton.apply(value, shape_tensor, starts, sampling_locations, attention_weights)
    return out.flatten(2)
