"""Callbacks: the ViT-L recipe's exponential-momentum EMA of the weights, and validation images with boxes for
loggers that take images (W&B, TensorBoard)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from codetr.visualize import draw_detections


def _full(value: Tensor) -> Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else ``value``."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def _like(value: Tensor, reference: Tensor) -> Tensor:
    """``value`` (a whole tensor, e.g. from a checkpoint) laid out like ``reference``: sharded the same way when
    that is an FSDP2 DTensor, on its device otherwise."""
    if isinstance(reference, DTensor) and not isinstance(value, DTensor):
        return distribute_tensor(value.to(reference.device), reference.device_mesh, reference.placements)
    return value.to(reference.device)


class ExpMomentumEMA(pl.Callback):
    """EMA with an exponentially decaying momentum (spec 9, mmdet's ``ExpMomentumEMA``; own implementation):
    ``m_t = (1 - momentum) * exp(-(t + 1) / warmup) + momentum`` and ``ema = (1 - m_t) * ema + m_t * current``
    after every optimiser step ``t`` (floating-point parameters and buffers; integer buffers are copied).
    Validation and test run with the averaged weights (swapped in, then back); checkpoints keep the raw weights
    under ``state_dict`` and the averaged ones under ``ema_state_dict`` (keys ``detector.*``), which
    :func:`codetr.utils.checkpoints.load_detector_state` prefers when present. Under FSDP2 each rank averages its
    own shard; checkpoints hold the whole tensors (gathered on save, re-sharded on resume)."""

    def __init__(self, momentum: float = 1e-4, warmup: int = 2000):
        self.momentum, self.warmup = float(momentum), int(warmup)
        self.ema: dict[str, Tensor] | None = None
        self.steps = 0
        self._backup: dict[str, Tensor] | None = None

    @staticmethod
    def _state(pl_module: pl.LightningModule) -> dict[str, Tensor]:
        return {f"detector.{k}": v for k, v in pl_module.detector.state_dict().items()}

    def momentum_at(self, step: int) -> float:
        return (1 - self.momentum) * math.exp(-(step + 1) / self.warmup) + self.momentum

    def _align(self, pl_module: pl.LightningModule) -> None:
        """Starts the average from the current weights, or puts restored averages on the weights' device / FSDP2
        sharding (FSDP2 restores callback states after ``on_fit_start``, hence also called on train start)."""
        current = self._state(pl_module)
        if self.ema is None:
            self.ema = {k: v.detach().clone() for k, v in current.items()}
        elif any(type(v) is not type(current[k]) or v.device != current[k].device for k, v in self.ema.items()):
            self.ema = {k: _like(v, current[k]) for k, v in self.ema.items()}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._align(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._align(pl_module)

    @torch.no_grad()
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        m = self.momentum_at(self.steps)
        for key, value in self._state(pl_module).items():
            average = self.ema[key]
            if average.is_floating_point():
                average.mul_(1 - m).add_(value.detach(), alpha=m)
            else:
                average.copy_(value)
        self.steps += 1

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self.ema is None or self._backup is not None:
            return
        self._align(pl_module)
        self._backup = {k: v.detach().clone() for k, v in self._state(pl_module).items()}
        pl_module.detector.load_state_dict({k.removeprefix("detector."): v for k, v in self.ema.items()})

    def _swap_out(self, pl_module: pl.LightningModule) -> None:
        if self._backup is None:
            return
        pl_module.detector.load_state_dict({k.removeprefix("detector."): v for k, v in self._backup.items()})
        self._backup = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if self.ema is not None:
            checkpoint["ema_state_dict"] = {k: _full(v.detach()).cpu().clone() for k, v in self.ema.items()}

    def state_dict(self) -> dict[str, Any]:
        ema = None if self.ema is None else {k: _full(v.detach()).cpu() for k, v in self.ema.items()}
        return {"steps": self.steps, "ema": ema}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps = int(state_dict["steps"])
        self.ema = state_dict["ema"]


class DetectionImageLogger(pl.Callback):
    """Logs the first ``num_images`` validation images of each epoch with predicted boxes (score >=
    ``score_threshold``) to every logger that supports images (WandbLogger ``log_image``, TensorBoard
    ``add_image``). Boxes are drawn in the network-input frame on the un-normalised uint8 image."""

    def __init__(self, num_images: int = 4, score_threshold: float = 0.3):
        self.num_images, self.score_threshold = int(num_images), float(score_threshold)
        self._images: list[Tensor] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._images = []

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if len(self._images) >= self.num_images or trainer.global_rank != 0:
            return
        detections = outputs if isinstance(outputs, list) else pl_module.detect_input_frame(batch)
        for image, det, (h, w) in zip(batch.images, detections, batch.image_sizes.tolist()):
            if len(self._images) >= self.num_images:
                break
            drawn = draw_detections(
                image[:, :h, :w].cpu(), det["boxes"], det["labels"], det["scores"], pl_module.class_names,
                self.score_threshold,
            )
            self._images.append(drawn)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._images or trainer.global_rank != 0:
            return
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(
                    key="val/predictions", images=[img.permute(1, 2, 0).numpy() for img in self._images],
                    step=trainer.global_step,
                )
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                for index, img in enumerate(self._images):
                    logger.experiment.add_image(f"val/predictions/{index}", img, trainer.global_step)
        self._images = []
