"""Training data order and augmentation randomness that survive a restart exactly.

Three pieces make a run killed mid-epoch and resumed from its last checkpoint draw the same samples with the same
augmentations as an uninterrupted run, whatever the number of workers:

* :class:`ResumableSampler` -- a ``DistributedSampler`` (so Lightning keeps it under DDP instead of wrapping it)
  that shuffles with ``seed + epoch`` and yields ``(index, sample_seed)`` pairs; it can start an epoch part-way.
* :class:`SeededSamples` -- wraps a map-style dataset: ``dataset[(index, sample_seed)]`` runs the wrapped
  ``__getitem__`` with torch / numpy / python ``random`` seeded from ``sample_seed`` and restores the caller's RNG
  states afterwards, so augmentation neither depends on the worker process nor consumes the training RNG.
* :class:`ResumableDataLoader` -- a ``DataLoader`` with ``state_dict`` / ``load_state_dict`` (Lightning saves them
  in every checkpoint, ``fit_loop.combined_loader``) recording the epoch and the batches the trainer consumed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler


class ResumableSampler(DistributedSampler):
    """Shuffled (or ordered) indices for this rank, each paired with a per-sample seed.

    Args:
        dataset: anything with ``len``.
        shuffle / seed / drop_last: as ``DistributedSampler`` (permutation seeded with ``seed + epoch``).
        num_replicas / rank: default from ``torch.distributed`` when initialised, else 1 / 0.
    Yields ``(index, sample_seed)`` with ``sample_seed`` a function of (seed, epoch, index) only.
    """

    def __init__(self, dataset: Any, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None):
        distributed = dist.is_available() and dist.is_initialized()
        num_replicas = num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self._resume: tuple[int, int] | None = None  # (epoch, position in this rank's indices) to start from

    def resume_at(self, epoch: int, position: int) -> None:
        """The next iteration over ``epoch`` starts at ``position``; iterations over other epochs start at 0."""
        self._resume = (int(epoch), int(position))

    def start_position(self) -> int:
        return self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0

    def sample_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 4_194_319 + index * 2_654_435_761) % (2**63 - 1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())
        start, self._resume = self.start_position(), None  # a restart position applies to one iteration only
        return iter([(index, self.sample_seed(index)) for index in indices[start:]])


class SeededSamples(Dataset):
    """``dataset[(index, sample_seed)]`` = ``base[index]`` computed with every RNG seeded from ``sample_seed``;
    a plain integer index reads the sample without seeding (evaluation, inspection)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getattr__(self, name: str) -> Any:  # class_names, category_ids, stats ... of the wrapped dataset
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __getitem__(self, item: int | tuple[int, int]) -> Any:
        if not isinstance(item, tuple):
            return self.base[item]
        index, seed = item
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            try:
                return self.base[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose state (epoch, batches consumed in it) Lightning
    checkpoints; after ``load_state_dict`` the next iteration starts where the checkpointed run stopped."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError(f"ResumableDataLoader needs a ResumableSampler, got {type(self.sampler).__name__}")
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        # len() stays the full epoch (Lightning counts batches from the restored progress up to it)
        self._yielded = self.sampler.start_position() // self.batch_size if self.batch_size else 0
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: batches of ``epoch`` handed out so far. Lightning's training fetcher does not
        read ahead for loaders with a length (``_PrefetchDataFetcher`` skips prefetching when ``length`` is known),
        so when a checkpoint is written every batch handed out has been trained on."""
        return {"epoch": int(self.sampler.epoch), "batches": int(self._yielded)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if self.batch_size is None:
            raise ValueError("ResumableDataLoader resumes batched loaders only (batch_size is None)")
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.resume_at(int(state["epoch"]), int(state["batches"]) * self.batch_size)
