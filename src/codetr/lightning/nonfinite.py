"""Skipping optimiser steps whose loss or gradients are not finite, and giving up after too many in a row.

One NaN batch (a degenerate sample, an fp16 overflow, a rare numerical corner of the matcher) should cost one
step, not a week-long run; a model that has diverged should stop with a clear error instead of writing NaN weights.
The decision is made after ``backward`` and before gradient clipping (Lightning's ``on_before_optimizer_step``):
a step is bad when a loss term or any gradient is NaN / inf; the flag is all-reduced (max) so every DDP rank skips
the same step, and a skipped step clears every gradient (``grad = None``), which AdamW treats as "no update" for
that parameter (no moment update, no step count). ``16-mixed`` training's GradScaler skips inf/NaN steps on its
own; such steps show up here too (scaled gradients are inf), so they are counted the same way.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

log = logging.getLogger(__name__)


def nonfinite_terms(losses: Mapping[str, Tensor | list[Tensor]]) -> list[str]:
    """``["name=value", ...]`` for every ``*loss*`` entry that is NaN / inf (one host-device transfer)."""
    names, values = [], []
    for key, value in losses.items():
        if "loss" not in key:
            continue
        for index, term in enumerate(value if isinstance(value, list | tuple) else [value]):
            names.append(key if not isinstance(value, list | tuple) else f"{key}[{index}]")
            values.append(term.detach().float().reshape(()))
    if not values:
        return []
    stacked = torch.stack(values).cpu().tolist()
    return [f"{name}={value:.4g}" for name, value in zip(names, stacked) if not math.isfinite(value)]


def gradients_finite(parameters: Iterable[nn.Parameter]) -> bool:
    """True when every existing gradient is finite (one host-device transfer). Sharded (FSDP2 DTensor) gradients
    are checked shard by shard on each rank; :meth:`NonFiniteStepGuard.decide` then agrees across ranks."""
    local = (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None)
    flags = [torch.isfinite(grad).all() for grad in local if grad.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def nonfinite_gradient_names(parameters: Iterable[nn.Parameter], names: Mapping[int, str], limit: int = 5) -> str:
    """``"a.weight, b.bias (+3 more)"``: the parameters whose gradient has NaN / inf (only called for a bad step)."""
    bad = []
    for parameter in parameters:
        grad = parameter.grad
        if grad is None or not grad.numel():
            continue
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        if not bool(torch.isfinite(local).all()):
            bad.append(names.get(id(parameter), f"<unnamed {tuple(parameter.shape)}>"))
    more = f" (+{len(bad) - limit} more)" if len(bad) > limit else ""
    return ", ".join(bad[:limit]) + more


class NonFiniteStepGuard:
    """Counts bad steps and decides. ``max_consecutive`` bad steps in a row raise :class:`FloatingPointError`
    (``0`` disables the limit)."""

    def __init__(self, max_consecutive: int = 5):
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self.consecutive = 0
        self.skipped_total = 0
        self.pending_reasons: list[str] = []

    def note(self, reasons: list[str]) -> None:
        """Records why the current step's forward is bad (loss terms, matching errors)."""
        self.pending_reasons.extend(reasons)

    def decide(
        self, parameters: list[nn.Parameter], device: torch.device, names: Mapping[int, str] | None = None
    ) -> list[str]:
        """Called once per optimiser step after backward: returns the reasons the step is bad (empty = good) after
        agreeing across ranks; clears the pending reasons. ``names`` (``id(parameter) -> name``) lets the reason
        name the parameters whose gradients are not finite."""
        reasons, self.pending_reasons = self.pending_reasons, []
        if not reasons and not gradients_finite(parameters):
            which = f" ({nonfinite_gradient_names(parameters, names)})" if names is not None else ""
            reasons = [f"non-finite gradients with finite loss terms{which}"]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([float(bool(reasons))], device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and not reasons:
                reasons = [f"another rank had a non-finite step (rank {dist.get_rank()} was finite)"]
        return reasons

    def skip(self, parameters: list[nn.Parameter], reasons: list[str], step: int) -> None:
        """Clears the gradients (no update) and raises after ``max_consecutive`` bad steps in a row."""
        for parameter in parameters:
            parameter.grad = None
        self.consecutive += 1
        self.skipped_total += 1
        log.warning("step %d skipped (%d in a row, %d in total): %s", step, self.consecutive, self.skipped_total,
                    "; ".join(reasons))
        if self.max_consecutive and self.consecutive >= self.max_consecutive:
            raise FloatingPointError(
                f"{self.consecutive} consecutive optimiser steps had non-finite losses or gradients (limit "
                f"max_consecutive_nonfinite={self.max_consecutive}); last at step {step}: {'; '.join(reasons)}. "
                "The weights are those of the last good step; lower the learning rate or check the data and "
                "resume from the last checkpoint."
            )

    def good(self) -> None:
        self.consecutive = 0
