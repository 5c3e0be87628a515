"""Progress of a run: the rich bar on a terminal, plain log lines when the output is a file.

Under SLURM, ``nohup`` or any redirect the rich bar cannot redraw: it renders once, when the epoch ends, and a COCO
epoch is hours. :func:`progress_bar` therefore picks :class:`TextProgress` when standard output is not a terminal:
a line every ``every_n_steps`` optimiser steps or ``every_seconds`` seconds (whichever comes first) with epoch,
step / total, images/s, ETA of the epoch and of the run, loss, learning rate and peak memory, written through the
``codetr.progress`` logger, so it reaches the console and the run's ``train.log``. Validation and epoch ends get a
line each. Only global rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

log = logging.getLogger("codetr.progress")


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def peak_memory(device: torch.device | None = None) -> str:
    """Peak accelerator memory of this process (CUDA: ``max_memory_allocated``), else its peak resident memory."""
    if device is not None and device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB gpu"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    return f"{kib / 2**20:.1f} GiB rss"


def _images_in(batch: Any) -> int:
    sizes = getattr(batch, "image_sizes", None)
    if sizes is not None:
        return len(sizes)
    if isinstance(batch, list | tuple) and batch and torch.is_tensor(batch[0]):
        return len(batch[0])
    return 1


class TextProgress(ProgressBar):
    """Plain-text progress lines (module docstring). ``every_n_steps`` / ``every_seconds``: 0 switches that trigger
    off."""

    def __init__(self, every_n_steps: int = 50, every_seconds: float = 60.0):
        super().__init__()
        if every_n_steps < 0 or every_seconds < 0:
            raise ValueError(f"every_n_steps ({every_n_steps}) and every_seconds ({every_seconds}) must be >= 0")
        self.every_n_steps, self.every_seconds = int(every_n_steps), float(every_seconds)
        self._enabled = True
        self._fit_start = self._epoch_start = self._last_line = 0.0
        self._images = 0
        self._steps_this_run = 0
        self._start_step = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _write(self, trainer: pl.Trainer, message: str, *args: Any) -> None:
        if self._enabled and trainer.is_global_zero:
            log.info(message, *args)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = self._last_line = time.monotonic()
        self._start_step = trainer.global_step
        total = trainer.estimated_stepping_batches
        self._write(trainer, "training: %s optimiser steps in all, %s batches per epoch, from step %d",
                    total if math.isfinite(total) else "?", self.total_train_batches, trainer.global_step)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = time.monotonic()
        self._images = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += _images_in(batch)
        now = time.monotonic()
        done = batch_idx + 1
        total = self.total_train_batches
        by_steps = self.every_n_steps and done % self.every_n_steps == 0
        by_time = self.every_seconds and now - self._last_line >= self.every_seconds
        if not (by_steps or by_time or done == total):
            return
        self._last_line = now
        elapsed = max(now - self._epoch_start, 1e-9)
        per_batch = elapsed / done
        epoch_eta = per_batch * (total - done) if math.isfinite(total) else float("nan")
        run_total = trainer.estimated_stepping_batches
        run_done = trainer.global_step - self._start_step
        run_elapsed = now - self._fit_start
        run_eta = (run_elapsed / run_done * (run_total - trainer.global_step)
                   if run_done > 0 and math.isfinite(run_total) else float("nan"))
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss_text = f"{float(loss.detach()):.4f}" if torch.is_tensor(loss) else "?"
        optimizers = trainer.optimizers
        lr = optimizers[0].param_groups[0]["lr"] if optimizers else float("nan")
        self._write(trainer, "epoch %d step %d/%s (global %d) | %.2f images/s | eta epoch %s, run %s | loss %s | "
                    "lr %.3g | peak %s", trainer.current_epoch, done, total, trainer.global_step,
                    self._images / elapsed, _duration(epoch_eta), _duration(run_eta), loss_text, lr,
                    peak_memory(pl_module.device))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, "epoch %d done in %s (%d images)", trainer.current_epoch,
                    _duration(time.monotonic() - self._epoch_start), self._images)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_start = time.monotonic()
        if not trainer.sanity_checking:
            self._write(trainer, "validation: %s batches", self.total_val_batches)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and torch.is_tensor(v) and v.numel() == 1}
        headline = [k for k in HEADLINE_METRICS if k in metrics] or sorted(metrics)[:6]
        shown = ", ".join(f"{k} {metrics[k]:.4f}" for k in headline)
        self._write(trainer, "validation done in %s%s", _duration(time.monotonic() - self._validation_start),
                    f": {shown}" if shown else "")


# what the one validation line shows when logged: box AP and, with a mask branch, mask AP
HEADLINE_METRICS = ("val/AP", "val/AP50", "val/AP75", "val/segm_AP", "val/segm_AP50", "val/segm_AP75")


def progress_bar(leave: bool = True, every_n_steps: int = 50, every_seconds: float = 60.0,
                 force_text: bool | None = None) -> ProgressBar:
    """The rich bar when standard output is a terminal, :class:`TextProgress` otherwise (``force_text`` True /
    False overrides the test)."""
    text = not sys.stdout.isatty() if force_text is None else force_text
    if text:
        return TextProgress(every_n_steps, every_seconds)
    return RichProgressBar(leave=leave)
