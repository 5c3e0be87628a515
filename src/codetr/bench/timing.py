"""Small timing / memory helpers shared by the benchmarks."""

from __future__ import annotations

import gc
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class Measurement:
    """One benchmark row: wall times in seconds (after warm-up), peak memory in MiB."""

    name: str
    params: dict
    times_s: list[float]
    peak_mem_mib: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None  # None: a row that measures no time

    @property
    def min_s(self) -> float | None:
        return min(self.times_s) if self.times_s else None

    def as_dict(self) -> dict:
        return {**asdict(self), "median_s": self.median_s, "min_s": self.min_s}


def peak_rss_mib() -> float:
    """Process peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    name: str, fn: Callable[[], object], params: dict, device: torch.device, repeats: int = 3, warmup: int = 1
) -> Measurement:
    """Run ``fn`` ``warmup`` + ``repeats`` times; report the repeats. GPU peak memory from the allocator,
    CPU peak from the process RSS high-water mark (a process-wide upper bound)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mib()
    return Measurement(name, params, times, peak)
