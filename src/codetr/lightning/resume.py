"""What a training run does with its run directory before fitting: removes checkpoint files that interrupted
writes left behind, and turns ``ckpt_path=last`` / ``last_if_exists`` into the newest checkpoint there.

``ckpt_path=last`` means "resume this run": with no checkpoint in the directory (a fresh ``hydra.run.dir``, a typo
in it) it is an error naming the directories searched, instead of Lightning's warning followed by a run from
scratch. ``ckpt_path=last_if_exists`` resumes when there is a checkpoint and starts from scratch otherwise (job
scripts that are re-submitted, e.g. SLURM requeues). Candidates: ``last*.ckpt`` in every ``ModelCheckpoint``
folder and ``hpc_ckpt_*.ckpt`` (Lightning's SLURM requeue checkpoints) in the run directory; the newest wins.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from codetr.lightning.checkpoint_io import remove_interrupted_writes

log = logging.getLogger(__name__)
RESUME_VALUES = ("last", "last_if_exists")


def checkpoint_directories(trainer: pl.Trainer) -> list[Path]:
    """Folders the trainer writes checkpoints to (``ModelCheckpoint`` folders, the run directory and its
    ``checkpoints/``, where :class:`codetr.lightning.signals.CheckpointOnSignal` writes without one)."""
    root = Path(trainer.default_root_dir)
    folders = [
        Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath
    ]
    return list(dict.fromkeys([*folders, root / "checkpoints", root]))


def remove_partial_checkpoints(trainer: pl.Trainer) -> int:
    """Delete what killed checkpoint writes left in the trainer's checkpoint folders; returns how many."""
    return sum(len(remove_interrupted_writes(folder)) for folder in checkpoint_directories(trainer))


def resolve_ckpt_path(trainer: pl.Trainer, ckpt_path: str | None) -> str | None:
    """``ckpt_path`` for ``trainer.fit``: paths and None unchanged, ``last`` / ``last_if_exists`` resolved (module
    docstring). Raises ``FileNotFoundError`` for ``last`` without a checkpoint."""
    if ckpt_path not in RESUME_VALUES:
        return ckpt_path
    folders = checkpoint_directories(trainer)
    candidates = [p for folder in folders if folder.is_dir() for p in folder.iterdir()
                  if p.suffix == ModelCheckpoint.FILE_EXTENSION and p.is_file()
                  and (p.name.startswith(ModelCheckpoint.CHECKPOINT_NAME_LAST) or p.name.startswith("hpc_ckpt_"))]
    if candidates:
        newest = max(candidates, key=lambda p: p.stat().st_mtime)
        log.info("ckpt_path=%s: resuming from %s", ckpt_path, newest)
        return str(newest)
    if ckpt_path == "last_if_exists":
        log.info("ckpt_path=last_if_exists: no checkpoint in %s yet, training from scratch", folders[0])
        return None
    raise FileNotFoundError(
        f"ckpt_path=last: no checkpoint to resume in {', '.join(str(f) for f in folders)}. To resume a run, pass its "
        "directory (hydra.run.dir=outputs/train/runs/<run>) or the file (ckpt_path=<path>.ckpt); to resume when "
        "there is a checkpoint and start from scratch otherwise, use ckpt_path=last_if_exists.")
