"""Estimated peak accelerator memory of one training step per image, for the reference recipes (R50 / Swin-L /
ViT-L, activation checkpointing as the recipe sets it and off).

No GPU is needed, and none is measured: the step runs on the CPU at two small input sizes under the PyTorch
profiler's memory timeline (every tensor allocation and free, the same bytes ``torch.cuda.max_memory_allocated``
counts on a GPU, before the caching allocator's rounding), the peak of live bytes is fitted as
``a + b * pixels`` (the backbone, encoder and auxiliary heads scale with pixels; parameters, gradients and the
decoder's 900 + denoising queries do not) and extrapolated to the recipe's LSJ canvas. AdamW's two fp32 moment
tensors per trainable parameter, allocated at the first optimizer step, are added. The CPU path differs from a
GPU's in kernels (attention kernels' saved tensors, SDPA workspaces), so the figures are estimates: fp32, batch 1,
without allocator fragmentation or CUDA context (~0.5 GiB). Where a GPU is lent, ``--device cuda`` of the
``model`` suite measures instead.
"""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from codetr.bench.model import build_detector, synthetic_batch
from codetr.bench.timing import Measurement

# (backbone, LSJ canvas of its recipe, sizes measured here, checkpointing off)
CASES = [
    ("r50", 1024, (256, 512), ("model.encoder_checkpoint_layers=0",)),
    ("swin_l", 1280, (256, 512), ("model.encoder_checkpoint_layers=0",)),
    ("vit_l", 1536, (384, 768), ("model.encoder_checkpoint_layers=0", "model.detector.backbone.use_checkpoint=false")),
]


def step_peak_bytes(backbone: str, size: int, overrides: tuple[str, ...]) -> dict:
    """Peak live tensor bytes over one training forward + backward at ``size`` x ``size`` (this process).

    Reads ``torch.profiler._memory_profiler.MemoryProfile``, the timeline behind the profiler's (deprecated)
    ``export_memory_timeline``; ``tests/test_bench_memory.py`` notices if a torch release changes it.
    """
    from torch.profiler import profile
    from torch.profiler._memory_profiler import Action, MemoryProfile

    torch.manual_seed(0)
    detector = build_detector(backbone, overrides=overrides).train()
    images, sizes, targets = synthetic_batch(1, size)
    trainable = sum(p.numel() for p in detector.parameters() if p.requires_grad)
    with profile(profile_memory=True, record_shapes=True, with_stack=True) as prof:
        losses = detector(images, sizes, targets)
        sum(v for k, v in losses.items() if "loss" in k).backward()
    live = peak = 0
    for _, action, _, nbytes in MemoryProfile(prof.profiler.kineto_results).timeline:
        if action in (Action.PREEXISTING, Action.CREATE):
            live += nbytes
        elif action == Action.DESTROY:
            live -= nbytes
        peak = max(peak, live)
    return {"peak_bytes": peak, "trainable_params": trainable}


def run(device: str = "cpu", repeats: int = 1) -> list[Measurement]:
    del device, repeats  # always one profiled CPU step per size
    rows = []
    for backbone, canvas, measured_sizes, no_checkpointing in CASES:
        for checkpointing, overrides in (("recipe", ()), ("off", no_checkpointing)):
            points = []
            for size in measured_sizes:
                command = [sys.executable, "-m", "codetr.bench.memory", backbone, str(size), *overrides]
                result = subprocess.run(command, capture_output=True, text=True, check=False)
                if result.returncode != 0:
                    raise RuntimeError(f"memory case {backbone}/{size} failed:\n{result.stderr[-2000:]}")
                points.append((size, json.loads(result.stdout.strip().splitlines()[-1])))
            (s1, m1), (s2, m2) = points
            per_pixel = (m2["peak_bytes"] - m1["peak_bytes"]) / (s2**2 - s1**2)
            step = m1["peak_bytes"] + per_pixel * (canvas**2 - s1**2)
            adamw = 8 * m1["trainable_params"]
            gib = (step + adamw) / 2**30
            params = {"model": backbone, "canvas": f"{canvas}x{canvas}", "checkpointing": checkpointing}
            extra = {
                "estimated_gib_per_image": round(gib, 1),
                **{f"measured_peak_mib@{s}": round(m["peak_bytes"] / 2**20) for s, m in points},
                "adamw_state_mib": round(adamw / 2**20),
            }
            row = Measurement("est. training peak", params, [], gib * 1024, extra)
            rows.append(row)
    return rows


if __name__ == "__main__":
    backbone, size = sys.argv[1], int(sys.argv[2])
    print(json.dumps(step_peak_bytes(backbone, size, tuple(sys.argv[3:]))))
