"""Swin Transformer backbone (docs/architecture.md#swin) from timm's Swin modules, run with the
detection-Swin windowing.

The parameters are timm's ``swin_large_patch4_window12_384`` modules (``patch_embed``, ``layers.{s}`` with the
patch merging at the *start* of stages 1..3, ``blocks.{j}.attn.qkv`` ...) plus four output LayerNorms ``norm{0..3}``
as in mmdet. The forward is our own loop over those modules because the detection Swin (original
Swin-Transformer-Object-Detection and mmdet, both used by Co-DETR) differs from timm's classifier forward on
arbitrary image sizes:

* the image is padded bottom/right to a multiple of the patch size;
* inside every block the map is padded bottom/right to a multiple of the window **before** the cyclic shift, the
  shifted-window mask (-100 between regions) is built on the padded grid, and the window never shrinks below
  ``window_size`` for small maps (timm shifts first, then pads, and shrinks the window);
* stage ``s`` output (for ``out_indices``) is taken after its blocks, before the next patch merging, and passes
  through ``norm{s}``; returned NCHW.

Weights: ``weights`` = None, a local file or a named source (:mod:`codetr.models.backbones.pretrained`: the official
``https://github.com/SwinTransformer/storage/releases/...`` files, ``timm://swin_..._224.ms_in1k``), in timm/our
naming, mmdet naming (``stages.*``, ``w_msa``, ``ffn.layers``, unfold-ordered patch merging) or the original Swin
naming of the released ImageNet files (``{"model": ...}``, ``layers.{s}.downsample`` at the end of stage s,
``attn_mask`` / ``relative_position_index`` buffers, classifier ``norm`` / ``head``); detector checkpoints with a
``backbone.`` prefix included. Key conversion: :func:`swin_from_mmdet`, :func:`swin_from_original` (and
:func:`swin_to_mmdet` for the reverse).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.swin_transformer import get_relative_position_index, window_partition, window_reverse
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from codetr.checkpoint_io import strip_prefix
from codetr.models.backbones.pretrained import load_pretrained

log = logging.getLogger(__name__)

MASK_VALUE = -100.0


class SwinTransformer(nn.Module):
    """Swin backbone; defaults = Swin-L (window 12, 384 px pre-training).

    Args:
        embed_dims: width of stage 0 (stage s has ``embed_dims * 2**s``).
        depths / num_heads: blocks and heads per stage.
        window_size, mlp_ratio, qkv_bias, patch_size: architecture (qk scale = head_dim ** -0.5).
        drop_path_rate: stochastic depth, linear over all blocks from 0 (recipe-dependent, docs/architecture.md#swin).
        attn_drop_rate, drop_rate: dropouts (0 in every recipe).
        out_indices: stages returned (0..3 -> strides 4, 8, 16, 32).
        with_cp: activation checkpointing per block (``use_reentrant=False``; no numerical effect).
        pretrain_img_size: image size the modules are created for (only timm's bookkeeping; any size runs).
        weights: see module docstring.
    Forward: ``images (B, 3, H, W)`` -> list of ``(B, embed_dims * 2**s, ceil(H / 2**(s+2)), ceil(W / 2**(s+2)))``.
    """

    def __init__(
        self,
        embed_dims: int = 192,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (6, 12, 24, 48),
        window_size: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        patch_size: int = 4,
        drop_path_rate: float = 0.3,
        attn_drop_rate: float = 0.0,
        drop_rate: float = 0.0,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        with_cp: bool = False,
        pretrain_img_size: int = 384,
        weights: str | Path | None = None,
    ):
        super().__init__()
        net = TimmSwin(
            img_size=pretrain_img_size, patch_size=patch_size, num_classes=0, global_pool="",
            embed_dim=embed_dims, depths=tuple(depths), num_heads=tuple(num_heads), window_size=window_size,
            mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_rate=drop_rate, proj_drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate, strict_img_size=False,
            always_partition=True,
        )
        self.patch_embed, self.layers = net.patch_embed, net.layers
        self.patch_size, self.window_size, self.with_cp = patch_size, window_size, with_cp
        self.out_indices = tuple(out_indices)
        widths = [embed_dims * 2**s for s in range(len(depths))]
        for s in self.out_indices:
            self.add_module(f"norm{s}", nn.LayerNorm(widths[s]))
        self.out_channels = [widths[s] for s in self.out_indices]
        self._masks: dict[tuple, Tensor] = {}
        if weights is not None:
            self.load_weights(weights)

    # ---------------------------------------------------------------- weights
    def load_weights(self, weights: str | Path, weights_dir: str | Path | None = None) -> list[str]:
        """Load a Swin file in any supported naming; returns the ignored source keys (classifier ``norm`` /
        ``head``, index / mask buffers). Only the detection output norms ``norm{s}`` may stay at their initial
        value (no ImageNet file has them); any other missing, unexpected or unconvertible key raises ``KeyError``."""
        state, source = load_pretrained(weights, weights_dir)
        state, unmapped, ignored = swin_to_codetr(strip_prefix(state, "backbone."))
        own = self.state_dict()
        ignored += [k for k in state if k.startswith("norm") and k not in own]  # unused output norms
        state = {k: v for k, v in state.items() if k not in ignored}
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not re.fullmatch(r"norm\d\.(weight|bias)", k)]
        if missing or unexpected or unmapped:
            raise KeyError(f"{source}: cannot load into SwinTransformer: missing {missing[:10]} ({len(missing)}), "
                           f"unexpected {unexpected[:10]}, unmapped {unmapped[:10]}")
        log.info("loaded Swin weights from %s", source)
        return ignored

    # ---------------------------------------------------------------- forward
    def _shift_mask(self, hp: int, wp: int, shift: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``(num_windows, ws*ws, ws*ws)`` additive mask separating the regions brought together by the shift."""
        key = (hp, wp, shift, device, dtype)
        if key not in self._masks:
            ws = self.window_size
            region = torch.zeros(1, hp, wp, 1, device=device)
            bounds = ((0, hp - ws), (hp - ws, hp - shift), (hp - shift, hp))
            bounds_w = ((0, wp - ws), (wp - ws, wp - shift), (wp - shift, wp))
            label = 0
            for h0, h1 in bounds:
                for w0, w1 in bounds_w:
                    region[:, h0:h1, w0:w1] = label
                    label += 1
            windows = window_partition(region, (ws, ws)).reshape(-1, ws * ws)
            diff = windows[:, None, :] - windows[:, :, None]
            self._masks[key] = torch.zeros_like(diff, dtype=dtype).masked_fill(diff != 0, MASK_VALUE)
        return self._masks[key]

    def _window_attention(self, block: nn.Module, x: Tensor, shift: int) -> Tensor:
        _, h, w, c = x.shape
        ws = self.window_size
        x = F.pad(x, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
        hp, wp = x.shape[1:3]
        mask = None
        if shift:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
            mask = self._shift_mask(hp, wp, shift, x.device, x.dtype)
        windows = window_partition(x, (ws, ws)).reshape(-1, ws * ws, c)
        out = block.attn(windows, mask=mask)
        out = window_reverse(out.reshape(-1, ws, ws, c), (ws, ws), hp, wp)
        if shift:
            out = torch.roll(out, shifts=(shift, shift), dims=(1, 2))
        return out[:, :h, :w].contiguous()

    def _block(self, block: nn.Module, x: Tensor, shift: int) -> Tensor:
        x = x + block.drop_path1(self._window_attention(block, block.norm1(x), shift))
        return x + block.drop_path2(block.mlp(block.norm2(x)))

    def forward(self, images: Tensor) -> list[Tensor]:
        h, w = images.shape[-2:]
        p = self.patch_size
        x = self.patch_embed(F.pad(images, (0, (p - w % p) % p, 0, (p - h % p) % p)))  # (B, H/4, W/4, C)
        outs = []
        for s, stage in enumerate(self.layers):
            x = stage.downsample(x)
            for j, block in enumerate(stage.blocks):
                shift = self.window_size // 2 if j % 2 else 0
                if self.with_cp and self.training and torch.is_grad_enabled():
                    x = checkpoint(self._block, block, x, shift, use_reentrant=False)
                else:
                    x = self._block(block, x, shift)
            if s in self.out_indices:
                outs.append(getattr(self, f"norm{s}")(x).permute(0, 3, 1, 2).contiguous())
            if s >= max(self.out_indices):
                break
        return outs


# -------------------------------------------------------------------- key conversion
def merge_unfold_to_original(t: Tensor) -> Tensor:
    """Patch-merging tensor (``reduction.weight (out, 4c)`` or ``norm.* (4c,)``) from mmdet's unfold layout
    (index ``ch * 4 + k``, k over the 2x2 kernel row-major = original groups 0, 2, 1, 3) to the original / timm
    layout (index ``g * c + ch``, groups x0 = (even h, even w), x1 = (odd h, even w), x2 = (even, odd), x3)."""
    lead = t.shape[:-1]
    c = t.shape[-1] // 4
    return t.reshape(*lead, c, 4).transpose(-1, -2)[..., [0, 2, 1, 3], :].reshape(*lead, 4 * c)


def merge_original_to_unfold(t: Tensor) -> Tensor:
    """Inverse of :func:`merge_unfold_to_original` (what mmdet's ``swin_converter`` does)."""
    lead = t.shape[:-1]
    c = t.shape[-1] // 4
    return t.reshape(*lead, 4, c)[..., [0, 2, 1, 3], :].transpose(-1, -2).reshape(*lead, 4 * c)


_MMDET_RULES = [
    (r"patch_embed\.projection\.(.*)", r"patch_embed.proj.\1"),
    (r"patch_embed\.norm\.(.*)", r"patch_embed.norm.\1"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_index", None),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.(qkv|proj)\.(weight|bias)", r"layers.\1.blocks.\2.attn.\3.\4"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.relative_position_bias_table",
     r"layers.\1.blocks.\2.attn.relative_position_bias_table"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc1.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.(weight|bias)", r"layers.\1.blocks.\2.mlp.fc2.\3"),
    (r"stages\.(\d+)\.blocks\.(\d+)\.(norm[12])\.(weight|bias)", r"layers.\1.blocks.\2.\3.\4"),
    (r"(norm\d)\.(weight|bias)", r"\1.\2"),
]
_ORIGINAL_RULES = [
    (r"layers\.(\d+)\.blocks\.(\d+)\.(attn_mask|attn\.relative_position_index)", None),
    (r"(layers\.\d+\.blocks\.\d+\.(?:norm[12]|attn\.qkv|attn\.proj|mlp\.fc[12])\.(?:weight|bias))", r"\1"),
    (r"(layers\.\d+\.blocks\.\d+\.attn\.relative_position_bias_table)", r"\1"),
    (r"patch_embed\.(proj|norm)\.(weight|bias)", r"patch_embed.\1.\2"),
    (r"(norm\d)\.(weight|bias)", r"\1.\2"),
    (r"(norm|head(\.fc)?)\.(weight|bias)", None),  # classifier final norm / head
]


def _standard_index(value: Tensor) -> bool:
    """A stored ``relative_position_index`` buffer equals the standard Swin table (which timm recomputes)."""
    ws = math.isqrt(value.shape[-1])
    return value.shape == (ws * ws, ws * ws) and torch.equal(value.long(), get_relative_position_index(ws, ws))


def _apply(rules, key: str) -> tuple[bool, str | None]:
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return True, None if repl is None else re.sub(pattern, repl, key)
    return False, None


def _convert_swin(state, downsample_stage_key: str, rules, merge) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Shared key walk: patch-merging keys move to the next stage (timm opens stage s+1 with it; ``merge`` fixes
    the channel order), other keys go through ``rules``. Returns ``(state, unmapped keys, dropped keys)``."""
    out, unmapped, dropped = {}, [], []
    for key, value in state.items():
        m = re.fullmatch(
            rf"{downsample_stage_key}\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)", key
        )
        if m:
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = merge(value)
            continue
        ok, new = _apply(rules, key)
        if key.endswith("relative_position_index") and not _standard_index(value):
            unmapped.append(f"{key} (not the standard relative position table)")
        elif not ok:
            unmapped.append(key)
        elif new is None:
            dropped.append(key)
        else:
            out[new] = value
    return out, unmapped, dropped


def swin_from_mmdet(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """mmdet Swin keys (no ``backbone.`` prefix) -> ours. Returns ``(state, unmapped keys, dropped keys)``."""
    return _convert_swin(state, "stages", _MMDET_RULES, merge_unfold_to_original)


def swin_from_original(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Original Swin keys (``layers.{s}.downsample`` closing stage s) -> ours (timm: opening stage s+1)."""
    return _convert_swin(state, "layers", _ORIGINAL_RULES, lambda value: value)


def swin_naming(state: Mapping[str, Tensor]) -> str:
    """``"mmdet"``, ``"original"`` or ``"codetr"`` (= timm) naming of a Swin state dict without prefix."""
    if any(k.startswith(("stages.", "patch_embed.projection")) for k in state):
        return "mmdet"
    if "layers.0.downsample.reduction.weight" in state or any(k.endswith("attn_mask") for k in state):
        return "original"
    return "codetr"


def swin_to_codetr(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str], list[str]]:
    """Any supported Swin naming -> ours; ``(state, unmapped, dropped)``."""
    naming = swin_naming(state)
    if naming == "mmdet":
        return swin_from_mmdet(state)
    if naming == "original":
        return swin_from_original(state)
    dropped = [k for k in state if k.endswith("relative_position_index") or k.startswith("head")
               or k in ("norm.weight", "norm.bias")]
    return {k: v for k, v in state.items() if k not in dropped}, [], dropped


def swin_to_mmdet(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Ours -> mmdet naming (for exporting / tests); ``relative_position_index`` buffers are not produced."""
    out = {}
    for key, value in state.items():
        m = re.fullmatch(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)", key)
        if m:
            out[f"stages.{int(m.group(1)) - 1}.downsample.{m.group(2)}"] = merge_original_to_unfold(value)
            continue
        new = key.replace("patch_embed.proj.", "patch_embed.projection.")
        new = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"stages.\1.blocks.\2.attn.w_msa.", new)
        new = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"stages.\1.blocks.\2.ffn.layers.0.0.", new)
        new = re.sub(r"^layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"stages.\1.blocks.\2.ffn.layers.1.", new)
        new = re.sub(r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks.", new)
        out[new] = value
    return out
