"""``StepCheckpoint``: a ``last.ckpt`` every N optimiser steps that a killed run resumes from exactly.

Lightning's ``ModelCheckpoint(every_n_train_steps=N)`` also saves after the last batch of an epoch, before that
epoch's validation. Lightning cannot resume such a checkpoint correctly: it treats the epoch as finished, so the
epoch is never validated (nor its ``on_train_epoch_end`` run, which is where the epoch's best / top-k checkpoint
is chosen), the random stream the skipped validation would have advanced is off by that much for the rest of the
run, and the loop's epoch counters are left half-advanced -- a second kill later in the next epoch makes that
epoch start over and train extra steps (a 16-step run ended with 17). This subclass never saves on the last batch
of an epoch; the epoch-end checkpoint written after validation (``callbacks.model_checkpoint``, which also writes
``last.ckpt``) covers it, and a run killed in between resumes from the step before and replays that one step.
For the same reason its end-of-training ``last.ckpt`` is only written when training stopped inside an epoch
(``max_steps``): otherwise the epoch-end checkpoint is the final one, as in a run that was never interrupted.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


def ends_epoch(trainer: pl.Trainer) -> bool:
    """True on the last training batch of the epoch (``limit_train_batches`` included)."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready >= trainer.num_training_batches


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``every_n_train_steps`` saves skip the last batch of an epoch (module docstring)."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if ends_epoch(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if ends_epoch(trainer):
            return
        super().on_train_end(trainer, pl_module)
