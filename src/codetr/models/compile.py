"""``torch.compile`` of the detector's dense regions, in place.

Regional compilation (``nn.Module.compile`` on the backbone, the neck and each encoder / decoder layer) rather than
one graph for the whole detector: the query selection, matching, the auxiliary heads' sampling and NMS have
data-dependent shapes that would break a single graph into many pieces and recompile on every new GT count,
while the regions below see fixed shapes whenever the input size is fixed (LSJ canvases; ``dynamic=False``).
In-place compilation keeps every parameter name, so checkpoints and ``codetr.convert`` are unaffected.

Inside a compiled region multi-scale deformable attention takes the exact PyTorch path (the compiled CPU kernel is
an opaque extension call), so compiled and eager results agree to float rounding (tests/test_compile.py).
Measured on the 2-core CPU machine it does not pay (see README "Performance"): use it on GPUs.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

REGIONS = ("backbone", "neck", "encoder", "decoder")


def region_modules(detector: nn.Module, regions: Sequence[str]) -> dict[str, nn.Module]:
    """``name -> module`` for the requested regions (encoder / decoder expand to their layers)."""
    unknown = sorted(set(regions) - set(REGIONS))
    if unknown:
        raise ValueError(f"unknown compile region(s) {unknown}; choose from {list(REGIONS)}")
    transformer = detector.query_head.transformer
    found: dict[str, nn.Module] = {}
    for region in regions:
        if region in ("backbone", "neck"):
            found[region] = getattr(detector, region)
        else:
            stack = transformer.encoder if region == "encoder" else transformer.decoder
            for index, layer in enumerate(stack.layers):
                found[f"{region}.layers.{index}"] = layer
    return found


def compile_regions(
    detector: nn.Module,
    regions: Sequence[str] = REGIONS,
    mode: str | None = None,
    dynamic: bool | None = None,
    backend: str = "inductor",
    fullgraph: bool = False,
) -> list[str]:
    """Compile the chosen regions in place (lazily: the first forward pays the compile time); returns their names.

    Args:
        regions: subset of ``backbone``, ``neck``, ``encoder``, ``decoder``.
        mode: ``torch.compile`` mode (``None`` = default, ``"max-autotune"``, ``"reduce-overhead"`` ...).
        dynamic: ``False`` for fixed input sizes (LSJ), ``None`` lets torch decide after a shape change.
        backend: ``"inductor"`` (generated kernels) or e.g. ``"aot_eager"`` (tracing only; tests).
    """
    modules = region_modules(detector, regions)
    for module in modules.values():
        module.compile(mode=mode, dynamic=dynamic, backend=backend, fullgraph=fullgraph)
    return list(modules)
