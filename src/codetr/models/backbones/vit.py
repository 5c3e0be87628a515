"""EVA-02-style plain ViT backbone of the original Co-DETR ViT-L configs (docs/architecture.md#vit-sfp),
one stride-16 output map.

A compact own implementation (timm's ``Eva`` uses other parameter names and a cls-token model; its weights are
converted on loading, :func:`eva_from_timm`), with the original repository's parameter names so Co-DETR ViT-L
checkpoints load unchanged: ``patch_embed.proj``, ``pos_embed``
``(1, 1 + (pretrain_img_size / patch)**2, C)`` (cls slot kept, unused), ``blocks.{i}.norm1`` / ``attn.{q,k,v}_proj``
(no bias) / ``attn.q_bias`` / ``attn.v_bias`` / ``attn.proj`` / ``norm2`` / ``mlp.{w1,w2,ffn_ln,w3}``, ``out_norm``.
Library pieces: ``F.scaled_dot_product_attention``, timm ``DropPath``, ``torch.utils.checkpoint``.

Block: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(SwiGLU(LN(x)))`` with
``SwiGLU(x) = w3(subLN(SiLU(w1 x) * w2 x))``; LayerNorm eps 1e-6 inside blocks, ``out_norm`` eps 1e-5 (torch default,
as the original). Window blocks pad the token grid bottom/right with zeros (after ``norm1``) to a multiple of the
window and attend within windows without masking the padding, as the original.

2-D RoPE (hand-written: no library has this exact layout): per head, the first half of the head dims rotates with the
row position and the second half with the column position; frequencies ``theta ** (-2j / (head_dim / 2))``,
``j < head_dim / 4``, each used for an adjacent pair of dims ``(2p, 2p + 1) -> (x0 cos - x1 sin, x1 cos + x0 sin)``.
Positions are rescaled to the ``pt_hw_seq_len`` (16) pre-training grid: ``t = arange(n) / n * 16``. Window blocks use
the window grid (``n = window_size``); global blocks use the current token grid (``use_lsj=False``, any size) or a
fixed ``img_size / patch`` grid (``use_lsj=True``, inputs must then be exactly ``img_size``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.checkpoint_io import strip_prefix
from codetr.models.backbones.pretrained import load_pretrained

log = logging.getLogger(__name__)
_TIMM_EVA_RULES = [
    (r"(blocks\.\d+)\.attn\.q_proj\.bias", r"\1.attn.q_bias"),
    (r"(blocks\.\d+)\.attn\.v_proj\.bias", r"\1.attn.v_bias"),
    (r"(blocks\.\d+)\.mlp\.fc1_g\.(weight|bias)", r"\1.mlp.w1.\2"),
    (r"(blocks\.\d+)\.mlp\.fc1_x\.(weight|bias)", r"\1.mlp.w2.\2"),
    (r"(blocks\.\d+)\.mlp\.norm\.(weight|bias)", r"\1.mlp.ffn_ln.\2"),
    (r"(blocks\.\d+)\.mlp\.fc2\.(weight|bias)", r"\1.mlp.w3.\2"),
]


def eva_from_timm(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """timm ``Eva`` (EVA-02, ``qkv_fused=False``, SwiGLU) keys -> original Co-DETR ViT keys. A fused ``qkv.weight``
    is split into q/k/v; the classifier parts (``norm``, ``fc_norm``, ``head``) are kept for the caller to ignore."""
    out = {}
    for key, value in state.items():
        fused = re.fullmatch(r"(blocks\.\d+)\.attn\.qkv\.weight", key)
        if fused:
            for name, part in zip(("q", "k", "v"), value.chunk(3, dim=0)):
                out[f"{fused.group(1)}.attn.{name}_proj.weight"] = part
            continue
        for pattern, repl in _TIMM_EVA_RULES:
            if re.fullmatch(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        out[key] = value
    return out


def rope_table(
    rows: int, cols: int, head_dim: int, pt_seq_len: int = 16, theta: float = 10000.0
) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of shape ``(rows * cols, head_dim)`` for a row-major token grid."""
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(0, 2 * quarter, 2, dtype=torch.float32) / (2 * quarter))  # (head_dim / 4,)
    t_h = torch.arange(rows, dtype=torch.float32) / rows * pt_seq_len
    t_w = torch.arange(cols, dtype=torch.float32) / cols * pt_seq_len
    ang_h = (t_h[:, None] * freqs).repeat_interleave(2, dim=-1)  # (rows, head_dim / 2)
    ang_w = (t_w[:, None] * freqs).repeat_interleave(2, dim=-1)  # (cols, head_dim / 2)
    ang = torch.cat([ang_h[:, None, :].expand(rows, cols, -1), ang_w[None, :, :].expand(rows, cols, -1)], dim=-1)
    ang = ang.reshape(rows * cols, -1)
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of the last dim of ``x (..., N, head_dim)`` by the table angles."""
    pairs = x.unflatten(-1, (-1, 2))
    rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class SwiGLU(nn.Module):
    """``w3(ffn_ln(SiLU(w1 x) * w2 x))`` (sub-LayerNorm before the output projection)."""

    def __init__(self, dim: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.w1, self.w2 = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.ffn_ln = nn.LayerNorm(hidden, eps=eps)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w3(self.ffn_ln(F.silu(self.w1(x)) * self.w2(x)))


class RopeAttention(nn.Module):
    """Multi-head self-attention over ``(B, N, C)`` tokens with q/v biases (no k bias) and 2-D RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, dim, bias=False)
        self.v_proj = nn.Linear(dim, dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, c = x.shape

        def heads(t: Tensor) -> Tensor:
            return t.reshape(b, n, self.num_heads, -1).transpose(1, 2)

        q = heads(F.linear(x, self.q_proj.weight, self.q_bias))
        k = heads(F.linear(x, self.k_proj.weight))
        v = heads(F.linear(x, self.v_proj.weight, self.v_bias))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)  # scale head_dim ** -0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class ViTBlock(nn.Module):
    """Pre-norm block; ``window_size > 0`` = window attention, 0 = global attention. Tokens are ``(B, H, W, C)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop_path: float, window_size: int,
                 qkv_bias: bool = True):
        super().__init__()
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RopeAttention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, h, w, c = x.shape
        y = self.norm1(x)
        ws = self.window_size
        if ws > 0:
            y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
            hp, wp = y.shape[1:3]
            y = y.reshape(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
            y = self.attn(y, cos, sin)
            y = y.reshape(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)[:, :h, :w]
        else:
            y = self.attn(y.reshape(b, h * w, c), cos, sin).reshape(b, h, w, c)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """EVA-02-style ViT (defaults = ViT-L of the Co-DINO COCO config).

    Args:
        img_size: canvas size; with ``use_lsj`` the global-block RoPE table is fixed to ``img_size / patch_size``.
        patch_size, embed_dim, depth, num_heads, mlp_ratio (SwiGLU hidden = int(embed_dim * mlp_ratio)).
        window_size: window of the windowed blocks; ``global_attn_indexes``: blocks with global attention.
        drop_path_rate: stochastic depth, linear over the blocks from 0.
        pretrain_img_size: size of the absolute position embedding grid (+1 cls slot when
            ``pretrain_use_cls_token``), bicubically interpolated to the token grid at run time.
        use_lsj: fixed global RoPE table (LVIS config) instead of one per token grid (COCO config).
        pt_hw_seq_len, rope_theta: RoPE position scale and base.
        use_checkpoint: activation checkpointing of every block (``use_reentrant=False``, no numerical effect).
        weights: None, a local file or a named source (:mod:`codetr.models.backbones.pretrained`, e.g. EVA-02's
            own ``hf://Yuxin-CV/EVA-02/eva02/pt/eva02_L_pt_m38m_p14to16.pt`` or timm's
            ``timm://eva02_large_patch14_224.mim_m38m``); original / EVA-02 naming or timm EVA naming,
            ``backbone.`` prefix / containers accepted; files with another patch size or position grid are
            resampled as the original does.
    Forward: ``images (B, 3, H, W)`` (H, W multiples of ``patch_size``) -> ``[(B, embed_dim, H / 16, W / 16)]``.
    """

    def __init__(
        self,
        img_size: int = 1536,
        patch_size: int = 16,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4 * 2 / 3,
        window_size: int = 24,
        global_attn_indexes: Sequence[int] = (3, 7, 11, 15, 19, 23),
        drop_path_rate: float = 0.4,
        pretrain_img_size: int = 512,
        pretrain_use_cls_token: bool = True,
        use_lsj: bool = False,
        pt_hw_seq_len: int = 16,
        rope_theta: float = 10000.0,
        qkv_bias: bool = True,
        use_checkpoint: bool = False,
        weights: str | Path | None = None,
    ):
        super().__init__()
        self.patch_size, self.img_size, self.use_lsj = patch_size, img_size, use_lsj
        self.use_checkpoint, self.pretrain_use_cls_token = use_checkpoint, pretrain_use_cls_token
        self.pt_hw_seq_len, self.rope_theta = pt_hw_seq_len, rope_theta
        self.head_dim = embed_dim // num_heads
        self.window_size = window_size
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, embed_dim, patch_size, stride=patch_size)
        grid = pretrain_img_size // patch_size
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + int(pretrain_use_cls_token), embed_dim))
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.global_attn_indexes = tuple(global_attn_indexes)
        self.blocks = nn.ModuleList(
            ViTBlock(embed_dim, num_heads, mlp_ratio, rates[i], 0 if i in self.global_attn_indexes else window_size,
                     qkv_bias)
            for i in range(depth)
        )
        self.out_norm = nn.LayerNorm(embed_dim)
        self.out_channels = [embed_dim]
        self._ropes: dict[tuple, tuple[Tensor, Tensor]] = {}
        self.reset_parameters()
        if weights is not None:
            self.load_weights(weights)

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) linears and position embedding, zero biases, unit LayerNorms."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    # ------------------------------------------------------------------ weights
    def load_weights(self, weights: str | Path, weights_dir: str | Path | None = None) -> list[str]:
        """Load a ViT / EVA-02 file; returns the ignored source keys (RoPE buffers, MIM / classifier parts:
        ``cls_token``, ``mask_token``, ``norm``, ``lm_head``, ``head``, ``fc_norm``). Only ``out_norm`` (absent from
        pre-training files) may stay at its initial value; any other missing / unexpected key raises ``KeyError``."""
        state, source = load_pretrained(weights, weights_dir)
        state = strip_prefix(state, "backbone.")
        if any(".mlp.fc1_g." in k for k in state):
            state = eva_from_timm(state)
        ignored = [k for k in state if "rope" in k or "relative_position_index" in k
                   or re.match(r"(head|fc_norm|norm|lm_head|cls_token|mask_token)\b", k)]
        state = {k: v.float() for k, v in state.items() if k not in ignored}
        proj = state.get("patch_embed.proj.weight")
        if proj is not None and proj.shape[-1] != self.patch_size:
            state["patch_embed.proj.weight"] = F.interpolate(proj, size=(self.patch_size,) * 2, mode="bicubic",
                                                             align_corners=False)
        pos = state.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape:
            extra = int(self.pretrain_use_cls_token)
            size = math.isqrt(self.pos_embed.shape[1] - extra)
            old = math.isqrt(pos.shape[1] - extra)
            grid = pos[:, extra:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(size, size), mode="bicubic", align_corners=False)
            state["pos_embed"] = torch.cat([pos[:, :extra], grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("out_norm.")]  # absent from pre-training files
        if missing or unexpected:
            raise KeyError(f"{source}: cannot load into ViT: missing {missing[:10]} ({len(missing)}), unexpected "
                           f"{unexpected[:10]} ({len(unexpected)})")
        log.info("loaded ViT weights from %s", source)
        return ignored

    # ------------------------------------------------------------------ forward
    def _rope(self, rows: int, cols: int, device: torch.device) -> tuple[Tensor, Tensor]:
        key = (rows, cols, device)
        if key not in self._ropes:
            cos, sin = rope_table(rows, cols, self.head_dim, self.pt_hw_seq_len, self.rope_theta)
            self._ropes[key] = (cos.to(device), sin.to(device))
        return self._ropes[key]

    def abs_pos(self, h: int, w: int) -> Tensor:
        """Absolute position embedding for an ``h x w`` token grid, ``(1, h, w, C)`` (cls slot dropped)."""
        pos = self.pos_embed[:, int(self.pretrain_use_cls_token):]
        size = math.isqrt(pos.shape[1])
        grid = pos.reshape(1, size, size, -1)
        if (size, size) == (h, w):
            return grid
        grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(h, w), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1)

    def forward(self, images: Tensor) -> list[Tensor]:
        x = self.patch_embed.proj(images).permute(0, 2, 3, 1)  # (B, H/16, W/16, C)
        h, w = x.shape[1:3]
        x = x + self.abs_pos(h, w)
        window_rope = self._rope(self.window_size, self.window_size, x.device)
        n = self.img_size // self.patch_size
        if self.use_lsj and (h, w) != (n, n):
            raise ValueError(f"use_lsj=True fixes the global RoPE grid to {n}x{n} tokens; got {h}x{w} "
                             f"(input must be {self.img_size}x{self.img_size})")
        global_rope = self._rope(h, w, x.device)  # with use_lsj this is the fixed img_size grid
        for block in self.blocks:
            cos, sin = window_rope if block.window_size > 0 else global_rope
            if self.use_checkpoint and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        return [self.out_norm(x).permute(0, 3, 1, 2).contiguous()]
