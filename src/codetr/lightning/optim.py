"""Optimiser parameter groups and learning-rate schedules of the reference recipes
(docs/architecture.md#optimisation).

* R50 / Swin-L: AdamW, one weight decay for every trainable tensor (norms, biases and embeddings included),
  learning rate x ``backbone_lr_mult`` for every parameter whose name contains ``backbone``, and x
  ``lr_mult_keys[key]`` for other parameters whose name contains ``key`` (the longest matching key wins, as in
  mmcv's ``custom_keys``; Co-Deformable-DETR: ``sampling_offsets`` 0.1).
* ViT-L (COCO): layer-wise decay instead: ``scale = decay ** (num_layers + 1 - layer_id)`` with layer_id 0 for
  the patch / position embeddings, ``i + 1`` for block ``i`` and ``num_layers + 1`` (scale 1) for everything else;
  1-D tensors and biases without weight decay (``no_decay_1d``). ``num_layers`` is the ViT's depth, read from the
  built backbone (``backbone.blocks``); a ``layer_decay_num_layers`` given in the config must equal it.
* Schedule: optional linear warm-up per iteration, then MultiStepLR per epoch.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from codetr.utils.config_keys import check_known_keys

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer index of a parameter for layer-wise lr decay (see module docstring). Only backbone parameters get a
    depth below ``num_layers + 1``."""
    if "backbone" not in name:
        return num_layers + 1
    if any(key in name for key in ("patch_embed", "pos_embed", "cls_token")):
        return 0
    match = _BLOCK.search(name)
    return int(match.group(1)) + 1 if match else num_layers + 1


def _key_mult(name: str, lr_mult_keys: Mapping[str, float]) -> float:
    matches = [key for key in lr_mult_keys if key in name]
    return float(lr_mult_keys[max(matches, key=len)]) if matches else 1.0


def vit_depth(model: nn.Module) -> int:
    """Number of blocks of the model's ViT backbone (``model.backbone.blocks``), the depth layer decay spans."""
    backbone = getattr(model, "backbone", None)
    blocks = getattr(backbone, "blocks", None)
    if blocks is None:
        raise ValueError(
            f"optimizer.layer_decay needs a ViT backbone with a 'blocks' list; this model's backbone is "
            f"{type(backbone).__name__} (set optimizer.layer_decay=null for the other backbones)"
        )
    return len(blocks)


def layer_decay_depth(model: nn.Module, layer_decay_num_layers: int | None) -> int:
    """The ViT depth of ``model``; a configured ``layer_decay_num_layers`` must agree with it."""
    depth = vit_depth(model)
    if layer_decay_num_layers is not None and int(layer_decay_num_layers) != depth:
        raise ValueError(
            f"optimizer.layer_decay_num_layers={layer_decay_num_layers} but the ViT backbone has {depth} blocks; "
            "leave it null (derived from the backbone) or make them equal"
        )
    return depth


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backbone_lr_mult: float = 0.1,
    layer_decay: float | None = None,
    layer_decay_num_layers: int | None = None,
    no_decay_1d: bool = False,
    lr_mult_keys: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Groups of trainable parameters with their ``lr`` / ``weight_decay`` (frozen parameters are left out).
    Each group also carries ``name`` (for the LR monitor) and ``lr_scale``. With ``layer_decay`` the depth is the
    ViT backbone's (:func:`layer_decay_depth`; ``layer_decay_num_layers`` None = take it from the backbone)."""
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    if layer_decay is not None:
        layer_decay_num_layers = layer_decay_depth(model, layer_decay_num_layers)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if layer_decay is not None:
            layer = vit_layer_id(name, layer_decay_num_layers)
            scale = layer_decay ** (layer_decay_num_layers + 1 - layer)
        else:
            scale = backbone_lr_mult if "backbone" in name else _key_mult(name, lr_mult_keys or {})
        decay = weight_decay
        # the ATSS scales are 0-d in the reference (decayed there) and (1,) here only so that FSDP2 can shard them
        one_dim = param.ndim == 1 and not name.endswith(".scale")
        if no_decay_1d and (one_dim or name.endswith(".bias") or "pos_embed" in name):
            decay = 0.0
        key = (scale, decay)
        if key not in groups:
            label = f"lr_x{scale:.4g}" + ("_no_wd" if decay == 0.0 and weight_decay != 0.0 else "")
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": decay, "lr_scale": scale, "name": label}
        groups[key]["params"].append(param)
    return sorted(groups.values(), key=lambda g: (-g["lr_scale"], -g["weight_decay"]))


OPTIMIZER_KEYS = ("lr", "weight_decay", "betas", "eps", "backbone_lr_mult", "layer_decay", "layer_decay_num_layers",
                  "no_decay_1d", "fused", "lr_mult_keys")
# milestone_table is read by the config itself (the milestones interpolation), not by the code.
SCHEDULER_KEYS = ("milestones", "gamma", "warmup_iters", "warmup_ratio", "milestone_table")


def check_optim_config(optimizer: Mapping[str, Any], scheduler: Mapping[str, Any]) -> None:
    """Refuse keys :func:`build_optimizer` / :func:`build_schedulers` would ignore
    (e.g. ``optimizer.learning_rate``)."""
    check_known_keys(optimizer, OPTIMIZER_KEYS, "optimizer")
    check_known_keys(scheduler, SCHEDULER_KEYS, "scheduler")


def build_optimizer(model: nn.Module, cfg: Mapping[str, Any]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` from the ``optimizer`` config (lr, weight_decay, betas, eps, ...)."""
    groups = param_groups(
        model,
        lr=float(cfg["lr"]),
        weight_decay=float(cfg["weight_decay"]),
        backbone_lr_mult=float(cfg.get("backbone_lr_mult", 1.0)),
        layer_decay=cfg.get("layer_decay"),
        layer_decay_num_layers=cfg.get("layer_decay_num_layers"),
        no_decay_1d=bool(cfg.get("no_decay_1d", False)),
        lr_mult_keys={str(k): float(v) for k, v in (cfg.get("lr_mult_keys") or {}).items()},
    )
    return torch.optim.AdamW(
        groups, lr=float(cfg["lr"]), betas=tuple(cfg.get("betas", (0.9, 0.999))), eps=float(cfg.get("eps", 1e-8)),
        fused=use_fused(model, cfg.get("fused", "auto")),
    )


def use_fused(model: nn.Module, setting: Any) -> bool | None:
    """``fused`` for AdamW: ``"auto"`` -> True when every trainable parameter is on CUDA (one kernel for all
    parameters instead of a loop), None (torch's default implementation) otherwise; True / False force it."""
    if setting in (True, False):
        return bool(setting)
    if setting not in ("auto", None):
        raise ValueError(f"optimizer.fused must be auto, true or false, got {setting!r}")
    params = [p for p in model.parameters() if p.requires_grad]
    return True if params and all(p.is_cuda for p in params) else None


def build_schedulers(optimizer: torch.optim.Optimizer, cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Lightning scheduler dicts: MultiStepLR stepped every epoch, preceded (chained) by a per-step LinearLR
    warm-up when ``warmup_iters > 0``. Both scale the current lr multiplicatively, so they compose."""
    schedulers: list[dict[str, Any]] = []
    warmup = int(cfg.get("warmup_iters", 0) or 0)
    if warmup > 0:
        linear = torch.optim.lr_scheduler.LinearLR(
            optimizer, start_factor=float(cfg.get("warmup_ratio", 0.01)), end_factor=1.0, total_iters=warmup
        )
        schedulers.append({"scheduler": linear, "interval": "step", "frequency": 1, "name": "warmup"})
    step = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[int(m) for m in cfg["milestones"]], gamma=float(cfg.get("gamma", 0.1))
    )
    schedulers.append({"scheduler": step, "interval": "epoch", "frequency": 1, "name": "lr"})
    return schedulers
