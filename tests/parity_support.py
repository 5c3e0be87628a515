"""Comparisons shared by every oracle parity test (Co-DINO, Co-Deformable-DETR, Co-DINO-Inst, DAB-DETR).

Everything a comparison depends on comes from the record itself: the RNG state the reference had before its call,
the loss keys, the parameters that received gradients and the scale of those gradients, so that another
reference (other sizes, seeds, images) runs unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

# Gradient norms are compared relatively, but against at least this fraction of the record's largest norm: a norm
# that small is float32 noise around (near-)cancellation -- a conv bias before a GroupNorm, a conv weight whose
# gradient the next GroupNorm almost removes, a scale that no positive reached -- so with the 1e-3 tolerance of the
# tests it must agree to 1e-8 of the largest norm instead.
GRADIENT_SCALE_FRACTION = 1e-5


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
    is ``|ours - reference| / max(|reference|, GRADIENT_SCALE_FRACTION * largest reference norm)``."""
    norms = record["values"][:, 0].tolist()
    scale = max((abs(n) for n in norms), default=1.0)
    floor = GRADIENT_SCALE_FRACTION * scale
    errors = []
    for name, norm in zip(record["names"], norms):
        grad = named[rename(name)].grad
        ours = grad.norm().item() if grad is not None else float("nan")
        errors.append((abs(ours - norm) / max(abs(norm), floor), name, ours, norm))
    return sorted(errors, key=lambda e: (e[0] != e[0], e[0]), reverse=True)


def parameters_with_gradients(named: Mapping[str, torch.nn.Parameter]) -> set[str]:
    """Names of the parameters that took part in the graph (a zero gradient counts: DDP needs every one used)."""
    return {n for n, p in named.items() if p.grad is not None}
