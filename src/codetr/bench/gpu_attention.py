"""GPU check, part 1: the Triton deformable-attention kernels against the exact path at the encoder's shapes.

Every query of the R50 recipe's encoder (all tokens of the 5 levels at the LSJ canvas, the recipe's batch, heads,
points) samples fresh random values at random locations (a few outside the maps). The reference is the exact path
(``grid_sample``) in float64 on the same inputs; each implementation runs in fp32 and in bf16 (inputs, output and
gradients in that dtype), forward and backward with one random output gradient. Errors are
``||out - ref|| / ||ref||`` over the output and the three input gradients (value, locations, weights), the
reference computed from the same inputs rounded to the dtype under test; times are
medians of synchronised repeats (:func:`codetr.bench.timing.measure`), the first call (Triton's compilation)
excluded and reported on its own.

On a machine without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``, set here before
Triton is imported) at the rehearsal's tiny shapes.
"""

from __future__ import annotations

import importlib.util
import os
import time

import torch

from codetr.bench.attention import encoder_shapes
from codetr.bench.gpu_child import CheckSizes, Reporter, device
from codetr.bench.model import compose_config
from codetr.bench.timing import measure, sync
from codetr.models.transformer.ms_deform_attn import multi_scale_deformable_attention

# Relative error below which a path "matches" the float64 reference: fp32 sums of a few dozen products land far
# under 1e-4; bf16 inputs and outputs carry 2^-9 rounding, so 1e-2 (the usual bf16 band is 1e-3 to 1e-2).
TOLERANCE = {"fp32": 1e-4, "bf16": 1e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def random_inputs(cfg, dev: torch.device, generator: torch.Generator) -> tuple[list[tuple[int, int]], dict]:
    """Fresh float64 inputs at the encoder's shapes of ``cfg`` (value, locations, weights, output gradient)."""
    transformer = cfg.model.detector.query_head.transformer
    heads, levels, points = transformer.num_heads, transformer.num_levels, transformer.num_points
    shapes = encoder_shapes(cfg.model.lsj_canvas)
    if len(shapes) != levels:
        raise ValueError(f"{len(shapes)} encoder levels at strides 4..64 but the config has num_levels={levels}")
    batch, tokens, dims = cfg.data.batch_size, sum(h * w for h, w in shapes), transformer.embed_dims // heads

    def rand(*size):
        return torch.rand(*size, generator=generator, dtype=torch.float64).to(dev)

    value = torch.randn(batch, tokens, heads, dims, generator=generator, dtype=torch.float64).to(dev)
    locations = rand(batch, tokens, heads, levels, points, 2) * 1.1 - 0.05
    weights = rand(batch, tokens, heads, levels, points).softmax(-1)
    grad_out = torch.randn(batch, tokens, heads * dims, generator=generator, dtype=torch.float64).to(dev)
    return shapes, {"value": value, "locations": locations, "weights": weights, "grad_out": grad_out}


def forward_backward(fn, shapes, inputs: dict, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn`` on ``inputs`` cast to ``dtype``; returns the output and the gradients of value, locations, weights."""
    leaves = [inputs[k].detach().to(dtype, copy=True).requires_grad_() for k in ("value", "locations", "weights")]
    out = fn(leaves[0], shapes, leaves[1], leaves[2])
    out.backward(inputs["grad_out"].to(dtype))
    return out.detach(), [leaf.grad for leaf in leaves]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)).item()


def check_impl(reporter: Reporter, name: str, fn, dtype_name: str, cfg, sizes, generator) -> None:
    dev, dtype = device(), DTYPES[dtype_name]
    shapes, inputs = random_inputs(cfg, dev, generator)
    # the reference sees the same (rounded) numbers as the path under test: the error is the path's arithmetic
    inputs = {k: v.to(dtype).double() for k, v in inputs.items()}
    reference, reference_grads = forward_backward(multi_scale_deformable_attention, shapes, inputs, torch.float64)
    start = time.perf_counter()
    out, grads = forward_backward(fn, shapes, inputs, dtype)  # the first call compiles the Triton kernels
    sync(dev)
    first_call_s = time.perf_counter() - start
    errors = {key: relative_error(a, e) for key, a, e in zip(
        ("out", "grad_value", "grad_locations", "grad_weights"), [out, *grads], [reference, *reference_grads])}
    finite = all(torch.isfinite(t).all().item() for t in [out, *grads])
    del reference, reference_grads, out, grads
    leaves = [inputs[k].detach().to(dtype, copy=True).requires_grad_() for k in ("value", "locations", "weights")]
    params = {"impl": name, "dtype": dtype_name}
    with torch.no_grad():
        fwd = measure("fwd", lambda: fn(leaves[0], shapes, leaves[1], leaves[2]), params, dev, sizes.repeats,
                      sizes.warmup)
    grad_out = inputs["grad_out"].to(dtype)
    both = measure("fwd+bwd", lambda: fn(leaves[0], shapes, leaves[1], leaves[2]).backward(grad_out), params, dev,
                   sizes.repeats, sizes.warmup)
    worst = max(errors.values())
    matches = finite and worst <= TOLERANCE[dtype_name]
    metrics = {"impl": name, "dtype": dtype_name, "shapes": shapes, "batch": cfg.data.batch_size,
               "queries": sum(h * w for h, w in shapes), "rel_errors": errors, "max_rel_error": worst,
               "finite": finite, "tolerance": TOLERANCE[dtype_name], "matches_reference": matches,
               "fwd_ms": fwd.median_s * 1e3, "fwd_bwd_ms": both.median_s * 1e3, "first_call_s": first_call_s,
               "peak_mib": both.peak_mem_mib, "repeats": len(both.times_s)}
    worst_key = max(errors, key=errors.get)
    summary = (f"max rel err {worst:.1e} [{worst_key}] ({'ok' if matches else 'ABOVE'} {TOLERANCE[dtype_name]:.0e}), "
               f"fwd {fwd.median_s * 1e3:.2f} ms, fwd+bwd {both.median_s * 1e3:.2f} ms, "
               f"first call {first_call_s:.1f} s")
    reporter.measured(f"{name} {dtype_name}", metrics, summary)


def run(reporter: Reporter, sizes: CheckSizes) -> None:
    part = sizes.attention
    if importlib.util.find_spec("triton") is None:
        reporter.skipped("triton", "Triton is not installed")
        return
    if device().type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, i.e. at the import below
    from codetr.models.transformer.ms_deform_attn_triton import multi_scale_deformable_attention_triton

    cfg = compose_config(part.overrides)
    generator = torch.Generator().manual_seed(0)
    impls = {"exact": multi_scale_deformable_attention, "triton": multi_scale_deformable_attention_triton}
    last = {name: 0.0 for name in impls}
    for dtype_name in DTYPES:
        for name, fn in impls.items():
            case = f"{name} {dtype_name}"
            last[name] = reporter.attempt(case, last[name], lambda n=name, f=fn, d=dtype_name: check_impl(
                reporter, n, f, d, cfg, part, generator)) or last[name]
