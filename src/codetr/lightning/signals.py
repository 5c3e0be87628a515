"""``CheckpointOnSignal``: a run stopped by SIGTERM (``kill``, Kubernetes / cloud preemption, ``scancel``) leaves
a ``last.ckpt`` to resume from.

Lightning handles the signal itself: its handler sets ``trainer.received_sigterm`` (agreed across DDP ranks) and
the fit loop raises ``SIGTERMException`` at the end of the current batch, so the state written here is
consistent (between two optimiser steps). Under SLURM with ``trainer=slurm`` (Lightning's
``SLURMEnvironment(auto_requeue=True)``) the requeue signal (SIGUSR1, ``sbatch --signal=USR1@90``) is handled
by Lightning: an ``hpc_ckpt_<n>.ckpt`` in the run directory and ``scontrol requeue <job id>``; the requeued job
finds that checkpoint again because the run directory is named after ``SLURM_JOB_ID`` (conf/hydra/default.yaml).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info


class CheckpointOnSignal(pl.Callback):
    """On ``SIGTERMException`` writes ``<checkpoint dir>/<filename>.ckpt`` (default ``last.ckpt``, which
    ``ckpt_path=last`` picks up) on every rank (``trainer.save_checkpoint`` is collective; rank 0 writes)."""

    def __init__(self, filename: str = "last"):
        self.filename = filename

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            directory = Path(callback.dirpath)
        else:
            directory = Path(trainer.default_root_dir) / "checkpoints"
        return directory / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"SIGTERM: checkpoint written to {path} (resume with ckpt_path={path})")
