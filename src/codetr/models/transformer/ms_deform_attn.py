"""Multi-scale deformable attention (Deformable DETR), written by hand: no well-kept library ships it.

The sampling core has two implementations, chosen per module by ``impl``:

* ``"pytorch"``: the exact pure-PyTorch formulation (one ``grid_sample`` per level); runs on every device,
  exports, and is the reference the fast kernels are tested against;
* ``"cpu_kernel"``: a compiled C++ kernel (``ms_deform_attn_cpu``), same sum without the large intermediate;
* ``"triton"``: Triton kernels for GPUs (``ms_deform_attn_triton``; opt-in, see that module);
* ``"auto"`` (default): the CPU kernel for CPU tensors when it builds, else the exact path (also while tracing,
  exporting or compiling).

Sampling always runs in float32, also under autocast, because bilinear sampling locations lose too much
precision in bf16/fp16.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttentionImpl = Literal["auto", "pytorch", "cpu_kernel", "triton"]


def _use_cpu_kernel(impl: str, tensor: Tensor) -> bool:
    if impl == "pytorch" or tensor.device.type != "cpu":
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling():
        return False
    from codetr.models.transformer.ms_deform_attn_cpu import cpu_kernel_available

    available = cpu_kernel_available()
    if impl == "cpu_kernel" and not available:
        raise RuntimeError("deformable attention impl='cpu_kernel' requested but the kernel could not be built")
    return available


class LevelLayout(NamedTuple):
    """Geometry of the flattened multi-scale token sequence.

    shapes: per level ``(h, w)`` (python ints, so no device sync is needed to split the sequence);
    offset_normalizer: ``(L, 2)`` float tensor of ``(w, h)`` per level, on the model's device.
    """

    shapes: list[tuple[int, int]]
    offset_normalizer: Tensor

    @classmethod
    def from_shapes(cls, shapes: list[tuple[int, int]], device: torch.device) -> LevelLayout:
        # built by arithmetic on a tensor, not torch.tensor(sizes): traced sizes stay symbolic (export)
        one = torch.ones((), dtype=torch.float32, device=device)
        norm = torch.stack([torch.stack([one * w, one * h]) for h, w in shapes])
        return cls(list(shapes), norm)

    @property
    def num_tokens(self) -> int:
        return sum(h * w for h, w in self.shapes)


def multi_scale_deformable_attention(
    value: Tensor, shapes: list[tuple[int, int]], sampling_locations: Tensor, attention_weights: Tensor
) -> Tensor:
    """Bilinear sampling of every head's value maps, weighted over levels and points.

    Args:
        value: ``(B, N, H, D)`` per-head values of the flattened levels (N = sum h*w).
        shapes: per level ``(h, w)``.
        sampling_locations: ``(B, Q, H, L, P, 2)`` normalised ``(x, y)`` in [0, 1], (0, 0) = top-left corner.
        attention_weights: ``(B, Q, H, L, P)``, softmax-normalised over ``L*P``.

    Returns:
        ``(B, Q, H*D)``.
    """
    batch, _, heads, head_dims = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    value_per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(shapes):
        value_l = value_per_level[level].flatten(2).transpose(1, 2).reshape(batch * heads, head_dims, h, w)
        grid_l = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*H, Q, P, 2)
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )  # (B*H, D, Q, P)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1)  # (B*H, D, Q)
    return out.view(batch, heads * head_dims, queries).transpose(1, 2).contiguous()


def _point_locations(ref: Tensor, offsets: Tensor, normalizer: Tensor) -> Tensor:
    """``ref + offsets / normalizer`` for point references, elementwise the same numbers as the broadcast form.

    ``ref``: ``(B, Q, 1, L, 1, 2)``; ``offsets``: ``(B, Q, H, L, P, 2)`` in pixels; ``normalizer``: ``(L, 2)``
    level ``(w, h)`` -> ``(B, Q, H, L, P, 2)`` normalised ``(x, y)``. Broadcasting over the size-2 last axis runs
    one element at a time (measured 57 ms for the R50 encoder's 7M values); laid out with ``L*P*2``
    contiguous values per (query, head) row the same division and addition vectorise (11 ms).
    """
    batch, queries, heads, levels, points, _ = offsets.shape
    row = levels * points * 2
    normalizer = normalizer[:, None, :].expand(levels, points, 2).reshape(row)
    ref = ref.expand(batch, queries, 1, levels, points, 2).reshape(batch, queries, 1, row)
    return (ref + offsets.reshape(batch, queries, heads, row) / normalizer).view(offsets.shape)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable attention over ``num_levels`` feature maps with ``num_points`` samples per head and level.

    Parameter names and layouts match the reference (``sampling_offsets`` rows ordered (head, level, point, xy),
    ``attention_weights`` rows (head, level, point)), so official weights load by name.
    The residual connection is left to the caller.
    """

    def __init__(
        self,
        embed_dims: int = 256,
        num_heads: int = 8,
        num_levels: int = 4,
        num_points: int = 4,
        impl: AttentionImpl = "auto",
    ):
        super().__init__()
        if impl not in ("auto", "pytorch", "cpu_kernel", "triton"):
            raise ValueError(f"deformable attention impl must be auto, pytorch, cpu_kernel or triton, got {impl!r}")
        self.impl = impl
        if embed_dims % num_heads:
            raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")
        self.embed_dims, self.num_heads = embed_dims, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.sampling_offsets = nn.Linear(embed_dims, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dims, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(embed_dims, embed_dims)
        self.output_proj = nn.Linear(embed_dims, embed_dims)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Offsets start on a ring of 8 directions (1..P pixels), attention uniform
        (docs/architecture.md#deformable-attention)."""
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        layout: LevelLayout,
        value_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Attend from ``query`` to the multi-scale ``value`` tokens.

        Args:
            query: ``(B, Q, C)`` including its positional term.
            reference_points: ``(B, Q, L, 2)`` normalised ``(x, y)`` points (encoder) or ``(B, Q, L, 4)``
                normalised ``cxcywh`` boxes (decoder), already multiplied by each level's valid ratio.
            value: ``(B, N, C)`` flattened level features.
            layout: level shapes of ``value``.
            value_padding_mask: ``(B, N)`` bool, True = padding (those values are zeroed).

        Returns:
            ``(B, Q, C)`` after ``output_proj`` (no residual).
        """
        batch, queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        # Projected as (B*N, C) rows so that the output is a tensor of its own: zeroing the padding in place then
        # saves a copy without autograd having to rebuild a view's base in backward.
        value = self.value_proj(value.reshape(-1, value.shape[-1]))
        if value_padding_mask is not None:
            value = value.masked_fill_(value_padding_mask.reshape(-1, 1), 0.0)
        value = value.view(batch, -1, heads, self.embed_dims // heads)
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(-1).view(batch, queries, heads, levels, points)
        with torch.autocast(device_type=query.device.type, enabled=False):
            offsets, weights, value = offsets.float(), weights.float(), value.float()
            ref = reference_points.float()[:, :, None, :, None, :]
            if ref.shape[-1] == 2:
                locations = _point_locations(ref, offsets, layout.offset_normalizer)
            elif ref.shape[-1] == 4:
                locations = ref[..., :2] + offsets / points * ref[..., 2:] * 0.5
            else:
                raise ValueError(f"reference_points must end in 2 or 4 values, got {tuple(reference_points.shape)}")
            if self.impl == "triton":
                from codetr.models.transformer.ms_deform_attn_triton import (
                    multi_scale_deformable_attention_triton,
                )

                out = multi_scale_deformable_attention_triton(value, layout.shapes, locations, weights)
            elif _use_cpu_kernel(self.impl, value):
                from codetr.models.transformer.ms_deform_attn_cpu import multi_scale_deformable_attention_cpu

                out = multi_scale_deformable_attention_cpu(value, layout.shapes, locations, weights)
            else:
                out = multi_scale_deformable_attention(value, layout.shapes, locations, weights)
        return self.output_proj(out.to(query.dtype))
