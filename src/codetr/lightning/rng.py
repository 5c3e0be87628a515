"""``RNGStateCheckpoint``: the global random states travel in every checkpoint, so a resumed run draws the same
denoising noise, RoI / RPN samples and drop-path masks as an uninterrupted one (Lightning itself does not save
them). Stored as tensors and plain ints so checkpoints still load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch


def capture_rng_states() -> dict[str, Any]:
    """torch (CPU + every CUDA device), numpy's legacy global generator and python ``random``."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    python = states["python"]
    random.setstate((python["version"], tuple(python["internal"]), python["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(pl.Callback):
    """Saves this rank's RNG states with the callback state and restores them when a run resumes. Under DDP each
    rank keeps its own stream; the checkpoint holds rank 0's, which the other ranks also take on resume (their
    streams differ from an uninterrupted run's, rank 0's is exact)."""

    def state_dict(self) -> dict[str, Any]:
        return capture_rng_states()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_states(state_dict)
