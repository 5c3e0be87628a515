"""``MemoryMonitor``: memory curves for the dashboards (W&B, TensorBoard, CSV).

Every ``every_n_steps`` optimiser steps it logs ``system/gpu_max_allocated_gib`` and ``system/gpu_max_reserved_gib``
(the peak since the previous log; the peak counters are reset after each log, so each point is the peak of its
interval) when training on CUDA, and ``system/host_peak_rss_gib`` (the process's peak resident memory since start)
always. Under DDP the maximum over ranks is logged.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import lightning.pytorch as pl
import torch

GIB = 1024**3


def host_peak_rss_bytes() -> int:
    """Peak resident set size of this process (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class MemoryMonitor(pl.Callback):
    def __init__(self, every_n_steps: int = 50):
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = int(every_n_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        values = {"system/host_peak_rss_gib": host_peak_rss_bytes() / GIB}
        device = pl_module.device
        if device.type == "cuda":
            values["system/gpu_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
            values["system/gpu_max_reserved_gib"] = torch.cuda.max_memory_reserved(device) / GIB
            torch.cuda.reset_peak_memory_stats(device)
        pl_module.log_dict(values, on_step=True, on_epoch=False, sync_dist=True, reduce_fx="max")
