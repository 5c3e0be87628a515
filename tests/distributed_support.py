"""Running a test body on several CPU ranks (gloo): ``run_ranks`` spawns them and fails, instead of hanging, when a
collective never completes."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


def run_ranks(worker: Callable[..., None], tmp_path: Path, *args: Any, world: int = 2, timeout: float = 300.0) -> dict:
    """Runs ``worker(rank, world, init_file, *args, results)`` in ``world`` spawned processes and returns what they
    put in ``results`` (a shared dict). ``init_file`` is a path for ``init_method=f"file://{init_file}"``."""
    manager = mp.Manager()
    results = manager.dict()
    context = mp.spawn(worker, args=(world, str(tmp_path / "dist_init"), *args, results), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=5):  # True once every rank has exited (raises on a rank's error)
        assert time.monotonic() < deadline, f"{world} ranks did not finish within {timeout:.0f} s (collective hang?)"
    os.environ.pop("MASTER_ADDR", None)
    return dict(results)
