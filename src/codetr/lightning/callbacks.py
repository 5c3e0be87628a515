"""Callbacks: the ViT-L recipe's exponential-momentum EMA of the weights, and validation images with boxes for
loggers that take images (W&B box overlays, TensorBoard images). The W&B evaluation dashboard is in
:mod:`codetr.lightning.wandb_dashboard`."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor
from torch.distributed.tensor import DTensor, distribute_tensor

from codetr.models.mask_ops import paste_masks
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
    """EMA with an exponentially decaying momentum (docs/architecture.md#optimisation, mmdet's
    ``ExpMomentumEMA``; own implementation): ``m_t = (1 - momentum) * exp(-(t + 1) / warmup) + momentum`` and
    ``ema = (1 - m_t) * ema + m_t * current`` after every optimiser step ``t`` (floating-point parameters and
    buffers; integer buffers are copied).
    Validation and test run with the averaged weights (swapped in, then back); checkpoints keep the raw weights
    under ``state_dict`` and the averaged ones under ``ema_state_dict`` (keys ``detector.*``), which
    :func:`codetr.checkpoint_io.detector_state` prefers when present. Under FSDP2 each rank averages its
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
    """Logs the first ``num_images`` validation images of each epoch with their boxes (and instance masks). W&B gets
    box overlays (``wandb.Image`` boxes: ``ground_truth`` and ``predictions`` as separate layers one can toggle, with
    class names and scores; predictions with score >= ``score_threshold``) and, for a model with a mask branch, mask
    layers of the same names (one class-labelled map per image, better-scored instances on top); TensorBoard
    (``add_image``) gets the predictions drawn into the pixels. Everything is in the network-input frame (``xyxy``
    input pixels) on the un-normalised uint8 image."""

    def __init__(self, num_images: int = 4, score_threshold: float = 0.3):
        self.num_images, self.score_threshold = int(num_images), float(score_threshold)
        self._samples: list[dict[str, Any]] = []

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._samples = []

    @torch.no_grad()
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if len(self._samples) >= self.num_images or trainer.global_rank != 0 or trainer.sanity_checking:
            return
        detections = outputs if isinstance(outputs, list) else pl_module.detect_input_frame(batch)
        for image, det, target, (h, w) in zip(batch.images, detections, batch.targets, batch.image_sizes.tolist()):
            if len(self._samples) >= self.num_images:
                break
            keep = det["scores"] >= self.score_threshold
            sample = {"image": image[:, :h, :w].cpu(), "boxes": det["boxes"][keep].cpu(),
                      "scores": det["scores"][keep].cpu(), "labels": det["labels"][keep].cpu(),
                      "gt_boxes": target["boxes"].cpu(), "gt_labels": target["labels"].cpu()}
            if "mask_probs" in det:  # pasted in the input frame, like the boxes
                threshold = float(pl_module.detector.mask_branch.mask_threshold)
                sample["masks"] = paste_masks(det["mask_probs"][keep].float().cpu(), sample["boxes"], h, w, threshold)
                if "masks" in target:
                    sample["gt_masks"] = target["masks"][:, :h, :w].cpu().bool()
            self._samples.append(sample)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._samples or trainer.global_rank != 0:
            return
        names = pl_module.class_names
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                images = [wandb_boxes_image(sample, names) for sample in self._samples]
                logger.log_metrics({"val/predictions": images}, step=trainer.global_step)
            elif hasattr(getattr(logger, "experiment", None), "add_image"):
                for index, sample in enumerate(self._samples):
                    drawn = draw_detections(sample["image"], sample["boxes"], sample["labels"], sample["scores"],
                                            names, self.score_threshold, masks=sample.get("masks"))
                    logger.experiment.add_image(f"val/predictions/{index}", drawn, trainer.global_step)
        self._samples = []


def wandb_boxes_image(sample: dict[str, Any], class_names: list[str] | None) -> Any:
    """``wandb.Image`` of ``sample["image"]`` (uint8 ``(3, H, W)``) with two box layers, ``ground_truth`` and
    ``predictions`` (``xyxy`` pixels, labels 0..K-1 named by ``class_names``)."""
    import wandb

    labels = {int(i): name for i, name in enumerate(class_names or [])}

    def layer(boxes: Tensor, classes: Tensor, scores: Tensor | None) -> dict[str, Any]:
        rows = []
        for index, ((x1, y1, x2, y2), label) in enumerate(zip(boxes.tolist(), classes.tolist())):
            name = labels.get(int(label), str(int(label)))
            row = {"position": {"minX": x1, "minY": y1, "maxX": x2, "maxY": y2}, "domain": "pixel",
                   "class_id": int(label), "box_caption": name}
            if scores is not None:
                row["scores"] = {"score": float(scores[index])}
                row["box_caption"] = f"{name} {float(scores[index]):.2f}"
            rows.append(row)
        known = {int(c): labels.get(int(c), str(int(c))) for c in classes.tolist()}
        return {"box_data": rows, "class_labels": {**labels, **known}}

    masks = {}
    for name, key, classes, scores in (("ground_truth", "gt_masks", "gt_labels", None),
                                       ("predictions", "masks", "labels", "scores")):
        if key in sample:
            masks[name] = {"mask_data": instance_label_map(sample[key], sample[classes],
                                                           sample[scores] if scores else None),
                           "class_labels": {0: "background", **{k + 1: v for k, v in labels.items()},
                                            **{int(c) + 1: labels.get(int(c), str(int(c)))
                                               for c in sample[classes].tolist()}}}
    return wandb.Image(sample["image"].permute(1, 2, 0).numpy(), boxes={
        "ground_truth": layer(sample["gt_boxes"], sample["gt_labels"], None),
        "predictions": layer(sample["boxes"], sample["labels"], sample["scores"]),
    }, **({"masks": masks} if masks else {}))


def instance_label_map(masks: Tensor, labels: Tensor, scores: Tensor | None = None) -> np.ndarray:
    """``(N, H, W)`` bool masks -> ``(H, W)`` int map of class index + 1 (0 = background), what W&B's mask layer
    shows; where masks overlap the better-scored one (else the later one) wins."""
    out = np.zeros(masks.shape[-2:], dtype=np.int64)
    order = scores.argsort().tolist() if scores is not None else range(len(masks))
    for index in order:
        out[masks[index].numpy()] = int(labels[index]) + 1
    return out
