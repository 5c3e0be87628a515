"""``CheckpointOnSignal``: a run stopped by SIGTERM (``kill``, Kubernetes / cloud preemption, ``scancel``) or by
Ctrl-C (SIGINT) leaves a ``last.ckpt`` to resume from.

Lightning handles SIGTERM itself: its handler sets ``trainer.received_sigterm`` (agreed across DDP ranks) and the
loops raise ``SIGTERMException`` at their next check, where this callback writes the checkpoint. The loops check
after every training batch but also after every validation batch and inside gradient accumulation, and a
checkpoint written there does not resume exactly (the partial validation's detections and the accumulated
gradients are not in it; with EMA, the averaged weights are swapped into the model during validation). So the
stop is deferred to the end of the optimiser step or, during validation, to the end of the epoch: the callback
takes the flag back at those checks and hands it to Lightning again at a safe one.

Ctrl-C gets the same treatment (Lightning alone stops at once, without a checkpoint): the first SIGINT asks for
a stop at the next safe point, a second one stops at once (Lightning's ``KeyboardInterrupt`` path, no checkpoint).

Under SLURM with ``trainer=slurm`` (Lightning's ``SLURMEnvironment(auto_requeue=True)``) the requeue signal (SIGUSR1,
``sbatch --signal=USR1@90``) is handled by Lightning: an ``hpc_ckpt_<n>.ckpt`` in the run directory and ``scontrol
requeue <job id>``; the requeued job finds that checkpoint again because the run directory is named after
``SLURM_JOB_ID`` (conf/hydra/default.yaml).
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from codetr.lightning.step_checkpoint import ends_epoch

_last_stop_signal: int | None = None


def last_stop_signal() -> int | None:
    """The signal (``signal.SIGINT`` / ``signal.SIGTERM``) that stopped the last fit of this process with a
    checkpoint, or None; the entry point turns it into the exit status shells expect (128 + signal: 130 for Ctrl-C,
    143 for SIGTERM), so a wrapper script can tell an interrupted run from a finished one."""
    return _last_stop_signal


class CheckpointOnSignal(pl.Callback):
    """On a stop request (SIGTERM, Ctrl-C) writes ``<checkpoint dir>/<filename>.ckpt`` (default ``last.ckpt``,
    which ``ckpt_path=last`` picks up) at the next point a run resumes exactly from (module docstring), on every
    rank (``trainer.save_checkpoint`` is collective; rank 0 writes)."""

    def __init__(self, filename: str = "last"):
        self.filename = filename
        self._pending = False  # a stop was requested and is held back until a safe point
        self._interrupts = 0
        self._previous_sigint: Any = None

    def checkpoint_path(self, trainer: pl.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            directory = Path(callback.dirpath)
        else:
            directory = Path(trainer.default_root_dir) / "checkpoints"
        return directory / f"{self.filename}{ModelCheckpoint.FILE_EXTENSION}"

    # ------------------------------------------------------------------ Ctrl-C
    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        self._interrupts += 1
        if self._interrupts > 1:
            raise KeyboardInterrupt
        self._pending = True
        rank_zero_warn("Ctrl-C: stopping after the current optimiser step (or at the end of this epoch's validation) "
                       "and writing last.ckpt; press Ctrl-C again to stop at once without a checkpoint")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after Lightning recorded the handlers it puts back at teardown (it would put ours back otherwise)
        self._pending, self._interrupts = False, 0
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore_sigint(self) -> None:
        """Puts the handler from before the fit back, unless someone replaced ours since (Lightning ignores further
        Ctrl-C while it shuts down after a second one)."""
        if (self._previous_sigint is not None and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) == self._on_sigint):
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_sigint()

    # ------------------------------------------------------------------ deferral
    def _hold(self, trainer: pl.Trainer) -> None:
        """Takes a stop request away from Lightning's next check (it would stop at an unsafe point)."""
        connector = trainer._signal_connector  # the flag behind trainer.received_sigterm
        self._pending = self._pending or connector.received_sigterm
        connector.received_sigterm = False

    def _release(self, trainer: pl.Trainer) -> None:
        """Hands a held stop request to Lightning's next check."""
        if self._pending:
            trainer._signal_connector.received_sigterm = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        stepped = not trainer.fit_loop.epoch_loop._should_accumulate()  # no public accessor in Lightning
        if stepped and not ends_epoch(trainer):
            self._release(trainer)  # checked right after this hook
        else:  # inside accumulation, or validation follows: wait
            self._hold(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._hold(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hold(trainer)
        self._release(trainer)  # the fit loop checks after the epoch-end hooks

    # ------------------------------------------------------------------ the checkpoint
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_sigint()
        if not isinstance(exception, SIGTERMException):
            return
        global _last_stop_signal
        _last_stop_signal = signal.SIGINT if self._interrupts else signal.SIGTERM
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        rank_zero_info(f"stopped by a signal: checkpoint written to {path} (resume with ckpt_path=last and the same "
                       f"hydra.run.dir, or ckpt_path={path})")
