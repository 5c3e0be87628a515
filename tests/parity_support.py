"""Comparisons shared by every oracle parity test (Co-DINO, Co-Deformable-DETR, Co-DINO-Inst, DAB-DETR).

Everything a comparison depends on comes from the record itself: the RNG state the reference had before its call,
the loss keys, the parameters that received gradients and the scale of those gradients, so that another
reference (other sizes, seeds, images) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# A gradient whose reference norm is below this fraction of the record's largest norm is zero in exact arithmetic
# (a conv bias before a GroupNorm, a scale that no positive reached): its float32 value is rounding noise, so it is
# compared with this absolute bound instead of relatively.
ZERO_GRADIENT_FRACTION = 1e-8


def seed_like_record(record: Mapping) -> None:
    """Puts the CPU RNG where the reference had it right before the recorded call (its own seed)."""
    if "cpu_rng_state_before_loss" in record:
        torch.set_rng_state(record["cpu_rng_state_before_loss"])
    else:
        torch.manual_seed(int(record["seed"]))


def reference_loss_values(record: Mapping) -> dict[str, float]:
    """The record's loss terms as floats (mmdet lists of per-level terms summed)."""
    return {k: float(sum(v) if isinstance(v, list) else v) for k, v in record["losses"].items()}


def loss_failures(
    losses: Mapping[str, torch.Tensor], reference: Mapping[str, float], rtol: float
) -> tuple[list, float]:
    """(failure lines, worst relative error) of every loss term against the reference; the key sets must match."""
    assert set(losses) == set(reference), f"keys differ: {sorted(set(losses) ^ set(reference))}"
    worst, failures = 0.0, []
    for key, expected in reference.items():
        value = float(losses[key].detach())
        error = abs(value - expected) / max(abs(expected), 1e-6)
        worst = max(worst, error)
        if error > rtol:
            failures.append(f"{key}: {value:.7g} vs {expected:.7g} (rel {error:.2g})")
    return failures, worst


def gradient_norm_errors(
    named: Mapping[str, torch.nn.Parameter], record: Mapping, rename: Callable[[str], str] = lambda n: n
) -> list[tuple[float, str, float, float]]:
    """(error, reference name, ours, reference) per parameter of a ``grad_norm_sum`` record, worst first. The error
    is relative, except for exactly-zero gradients (see :data:`ZERO_GRADIENT_FRACTION`), whose absolute difference is
    divided by the record's largest norm."""
    norms = record["values"][:, 0].tolist()
    scale = max(abs(n) for n in norms) if norms else 1.0
    floor = ZERO_GRADIENT_FRACTION * scale
    errors = []
    for name, norm in zip(record["names"], norms):
        grad = named[rename(name)].grad
        ours = grad.norm().item() if grad is not None else float("nan")
        if abs(norm) <= floor:
            error = abs(ours - norm) / scale if abs(ours) <= 10 * floor else float("inf")
        else:
            error = abs(ours - norm) / abs(norm)
        errors.append((error, name, ours, norm))
    return sorted(errors, key=lambda e: (e[0] != e[0], e[0]), reverse=True)


def parameters_with_gradients(named: Mapping[str, torch.nn.Parameter]) -> set[str]:
    """Names of the parameters that took part in the graph (a zero gradient counts: DDP needs every one used)."""
    return {n for n, p in named.items() if p.grad is not None}
