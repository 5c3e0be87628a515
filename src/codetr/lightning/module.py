"""``CoDETRModule``: the thin Lightning shell around the plain-torch detector.

It normalises uint8 batches on the device, sums the detector's loss terms, logs them, builds the reference
optimiser / schedule (:mod:`codetr.lightning.optim`) and evaluates COCO-style AP on the ORIGINAL image frame
(detections are divided by each image's resize ``scale_factors`` before they reach the evaluator).

Checkpoint keys are ``detector.<mmdet-like names>`` (``detector.backbone.*``, ``detector.query_head.*``, ...).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from codetr.data import normalize_images
from codetr.lightning.nonfinite import NonFiniteStepGuard, nonfinite_terms
from codetr.lightning.optim import build_optimizer, build_schedulers, check_optim_config
from codetr.lightning.strategies import FullyShardedStrategy
from codetr.models.losses.matcher import tolerate_nonfinite_costs

EPOCH_LOSS_KEY = "codetr_epoch_loss"
PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def total_loss(losses: Mapping[str, Tensor]) -> Tensor:
    """Sum of every entry whose key contains ``loss`` (list values summed element-wise); ``acc*`` etc. excluded."""
    terms = []
    for key, value in losses.items():
        if "loss" not in key:
            continue
        terms.extend(value if isinstance(value, list | tuple) else [value])
    if not terms:
        raise ValueError(f"the detector returned no loss terms (keys: {sorted(losses)})")
    return torch.stack([t.float() for t in terms]).sum()


def to_original_frame(detections: Sequence[dict[str, Tensor]], scale_factors: Tensor) -> list[dict[str, Tensor]]:
    """Detections ``xyxy`` in input pixels -> original image pixels: divide by ``scale_factors`` ``(B, 2)``
    (w_scale, h_scale). LSJ / DETR padding lies bottom/right, so no offset is involved
    (docs/architecture.md#postprocess)."""
    out = []
    for det, (w_scale, h_scale) in zip(detections, scale_factors.tolist()):
        factor = det["boxes"].new_tensor([w_scale, h_scale, w_scale, h_scale])
        out.append({**det, "boxes": det["boxes"] / factor})
    return out


def with_rle_masks(detections: Sequence[dict[str, Tensor]], orig_sizes: Tensor, top: int,
                   threshold: float) -> list[dict[str, Any]]:
    """Original-frame detections with ``mask_probs`` -> the ``top`` best by mask score with their masks pasted at
    the original image size and encoded as RLE (``masks``), on this rank; the probabilities are dropped."""
    from codetr.utils.rle import paste_and_encode

    out = []
    for det, (height, width) in zip(detections, orig_sizes.tolist()):
        order = det["mask_scores"].argsort(descending=True)[:top]
        kept = {k: v[order] for k, v in det.items() if k != "mask_probs"}
        kept["masks"] = paste_and_encode(det["mask_probs"][order], kept["boxes"], int(height), int(width), threshold)
        out.append(kept)
    return out


def evaluation_outputs(stage: str, metrics: dict[str, float], evaluator: Any) -> dict[str, Any]:
    """What an evaluation leaves for the tables, files and dashboards: metrics, box ``details`` / ``results`` and,
    when the evaluator computed mask AP, ``segm_details`` / ``segm_results`` (else None)."""
    segm = bool(getattr(evaluator, "segm", False))
    return {"stage": stage, "metrics": metrics, "details": getattr(evaluator, "details", None),
            "results": getattr(evaluator, "results", None),
            "segm_details": evaluator.segm_details if segm else None,
            "segm_results": evaluator.segm_results if segm else None}


class CoDETRModule(pl.LightningModule):
    """Training / evaluation / prediction of a :class:`codetr.models.co_detr.CoDETR`.

    Args:
        detector: the ``nn.Module`` (kept as ``self.detector``).
        optimizer: mapping with ``lr``, ``weight_decay``, ``betas``, ``eps``, ``backbone_lr_mult``,
            ``layer_decay`` (None or float), ``layer_decay_num_layers``, ``no_decay_1d``.
        scheduler: mapping with ``milestones`` (epochs), ``gamma``, ``warmup_iters``, ``warmup_ratio``.
        pixel_mean / pixel_std: RGB normalisation on the 0-255 scale.
        class_names: K names (predictions / images); optional.
        evaluator_factory: ``callable(stage) -> evaluator`` with ``update(image_ids, detections)`` and
            ``compute() -> dict[str, float]`` (e.g. :class:`codetr.evaluation.CocoEvaluator`, a torchmetrics
            ``Metric``: moved to the module's device and synchronised across ranks); when None the
            datamodule's ``evaluator(stage)`` is used if it has one, else AP is not computed.
        check_finite: skip optimiser steps whose loss terms or gradients are NaN / inf, with a warning naming the
            terms (:mod:`codetr.lightning.nonfinite`; two host-device transfers per step). Off: no checks.
        max_consecutive_nonfinite: that many skipped steps in a row stop training with ``FloatingPointError``
            (0 = never); the weights stay those of the last good step.
        description: what rebuilds the detector without Hydra (:class:`codetr.inference.ModelDescription` as a
            dict); written into every checkpoint as ``checkpoint["codetr_model"]``.
    """

    def __init__(
        self,
        detector: nn.Module,
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any],
        pixel_mean: Sequence[float] = PIXEL_MEAN,
        pixel_std: Sequence[float] = PIXEL_STD,
        class_names: Sequence[str] | None = None,
        evaluator_factory: Callable[[str], Any] | None = None,
        check_finite: bool = True,
        max_consecutive_nonfinite: int = 5,
        description: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        check_optim_config(optimizer, scheduler)
        self.detector = detector
        self.optimizer_cfg = dict(optimizer)
        self.scheduler_cfg = dict(scheduler)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)
        self.class_names = list(class_names) if class_names is not None else None
        self.evaluator_factory = evaluator_factory
        self.check_finite = check_finite
        self.nonfinite_guard = NonFiniteStepGuard(max_consecutive_nonfinite)
        self._evaluators: dict[str, Any] = {}
        # the last evaluation's metrics, per-class AP / PR curves and COCO result records (for evaluate, callbacks)
        self.last_evaluation: dict[str, Any] | None = None
        # evaluation only: each detection's box, filled, as its mask (the baseline mask AP; codetr.evaluate)
        self.masks_from_boxes = False
        self.description = dict(description) if description is not None else None
        # running sum / count of this epoch's (rank-averaged, finite) step losses, saved in every checkpoint so that
        # a mid-epoch resume logs train/loss_epoch over the whole epoch, not only the steps after the restart
        self._epoch_loss = {"sum": 0.0, "count": 0, "epoch": -1}
        self.save_hyperparameters(
            {"optimizer": self.optimizer_cfg, "scheduler": self.scheduler_cfg, "pixel_mean": list(pixel_mean),
             "pixel_std": list(pixel_std), "class_names": self.class_names}
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.description is not None:
            checkpoint["codetr_model"] = self.description
        checkpoint[EPOCH_LOSS_KEY] = dict(self._epoch_loss)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(EPOCH_LOSS_KEY)
        if isinstance(saved, Mapping) and saved.get("epoch") == checkpoint.get("epoch"):
            self._epoch_loss = {"sum": float(saved["sum"]), "count": int(saved["count"]), "epoch": saved["epoch"]}

    # ------------------------------------------------------------------ helpers
    def normalize(self, batch: Any) -> Tensor:
        """uint8 ``(B, 3, H, W)`` -> normalised float; padded pixels (``batch.padding_mask``) set to 0."""
        return normalize_images(batch.images, batch.padding_mask, self.pixel_mean, self.pixel_std)

    def detect_input_frame(self, batch: Any) -> list[dict[str, Tensor]]:
        """Main-head detections, ``xyxy`` in network-input pixels (the detector runs in eval mode, so no
        auxiliary head is executed)."""
        was_training = self.detector.training
        self.detector.eval()
        try:
            return self.detector(self.normalize(batch), batch.image_sizes)
        finally:
            self.detector.train(was_training)

    def detect(self, batch: Any) -> list[dict[str, Tensor]]:
        """Main-head detections in ORIGINAL image pixels."""
        return to_original_frame(self.detect_input_frame(batch), batch.scale_factors)

    def forward(self, batch: Any) -> list[dict[str, Tensor]]:
        return self.detect(batch)

    # ------------------------------------------------------------------ training
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        size = len(batch.image_sizes)
        # With the guard on, NaN predictions do not stop matching: the forward and backward complete on every rank
        # (DDP / FSDP collectives stay in step), the loss terms come out NaN and the step is skipped on all ranks.
        tolerate = tolerate_nonfinite_costs() if self.check_finite else contextlib.nullcontext()
        with tolerate:
            losses = self.detector(self.normalize(batch), batch.image_sizes, batch.targets)
        loss = total_loss(losses)
        if self.check_finite:
            self.nonfinite_guard.note(nonfinite_terms(losses))
        # one all-reduce per step (as sync_dist did); every rank then holds the same value, so rank 0's checkpoint
        # carries the epoch aggregate of all ranks
        global_loss = loss.detach().float()
        if self._trainer is not None:
            global_loss = self._trainer.strategy.reduce(global_loss, reduce_op="mean")
        self.log("train/loss_step", global_loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=size)
        value = float(global_loss)
        if math.isfinite(value):  # skipped (non-finite) steps are counted in train/skipped_steps, not averaged
            if self._epoch_loss["epoch"] != self.current_epoch:
                self._epoch_loss = {"sum": 0.0, "count": 0, "epoch": self.current_epoch}
            self._epoch_loss["sum"] += value
            self._epoch_loss["count"] += 1
        self.log_dict(
            {f"train/{k}": v.detach().float() for k, v in losses.items() if not isinstance(v, list | tuple)},
            on_step=True, on_epoch=False, batch_size=size,
        )
        return loss

    def on_train_epoch_end(self) -> None:
        """``train/loss_epoch``: mean of the epoch's finite step losses, restored across mid-epoch resumes."""
        if self._epoch_loss["epoch"] == self.current_epoch and self._epoch_loss["count"]:
            mean = self._epoch_loss["sum"] / self._epoch_loss["count"]
            self.log("train/loss_epoch", mean, on_step=False, on_epoch=True, sync_dist=False)
        self._epoch_loss = {"sum": 0.0, "count": 0, "epoch": -1}

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Skips (clears the gradients of) a step whose loss terms or gradients are not finite, on every rank."""
        if not self.check_finite:
            return
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        names = {id(p): name for name, p in self.detector.named_parameters()}
        reasons = self.nonfinite_guard.decide(parameters, self.device, names)
        if reasons:
            self.nonfinite_guard.skip(parameters, reasons, self.global_step)
            self.log("train/skipped_steps", float(self.nonfinite_guard.skipped_total), on_step=True, on_epoch=False)
        else:
            self.nonfinite_guard.good()

    # ------------------------------------------------------------------ evaluation
    def _make_evaluator(self, stage: str) -> Any:
        if self.evaluator_factory is not None:
            return self.evaluator_factory(stage)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "evaluator"):
            return datamodule.evaluator(stage)
        return None

    def _eval_start(self, stage: str) -> None:
        evaluator = self._make_evaluator(stage)
        if isinstance(evaluator, Metric):
            evaluator = evaluator.to(self.device)  # DDP sync gathers the state on the device (NCCL: CUDA tensors)
        self._evaluators[stage] = evaluator

    def _eval_step(self, stage: str, batch: Any) -> list[dict[str, Tensor]]:
        """Feeds the evaluator (original frame); returns the input-frame detections for callbacks."""
        detections = self.detect_input_frame(batch)
        evaluator = self._evaluators.get(stage)
        if evaluator is not None:
            original = to_original_frame(detections, batch.scale_factors)
            if getattr(evaluator, "segm", False):
                if self.masks_from_boxes:
                    original = [{**d, "mask_probs": torch.ones_like(d["mask_probs"]), "mask_scores": d["scores"]}
                                for d in original]
                original = with_rle_masks(original, batch.orig_sizes, evaluator.max_detections,
                                          self.detector.mask_branch.mask_threshold)
            evaluator.update([int(i) for i in batch.image_ids],
                             [{k: v.cpu() if isinstance(v, Tensor) else v for k, v in d.items()} for d in original])
        return detections

    def _eval_end(self, stage: str) -> dict[str, float]:
        evaluator = self._evaluators.pop(stage, None)
        if evaluator is None:
            return {}
        metrics = {k: float(v) for k, v in evaluator.compute().items() if isinstance(v, int | float)}
        # compute() returns the same numbers on every rank (gathered predictions), so no reduction is needed.
        for key, value in metrics.items():
            self.log(f"{stage}/{key}", value, sync_dist=False, prog_bar=key == "AP")
        self.last_evaluation = evaluation_outputs(stage, metrics, evaluator)
        return metrics

    def on_validation_epoch_start(self) -> None:
        self._eval_start("val")

    def validation_step(self, batch: Any, batch_idx: int) -> list[dict[str, Tensor]]:
        return self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self.last_metrics = self._eval_end("val")

    def on_test_epoch_start(self) -> None:
        self._eval_start("test")

    def test_step(self, batch: Any, batch_idx: int) -> list[dict[str, Tensor]]:
        return self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self.last_metrics = self._eval_end("test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """Per image ``{"image_id", "boxes" (N, 4) xyxy original pixels, "scores", "labels"}`` on the CPU."""
        detections = self.detect(batch)
        return [
            {"image_id": int(image_id), **{k: v.cpu() for k, v in det.items()}}
            for image_id, det in zip(batch.image_ids, detections)
        ]

    # ------------------------------------------------------------------ optimisation
    def configure_model(self) -> None:
        """Shards the detector with FSDP2 under ``trainer=fsdp`` (:class:`FullyShardedStrategy`); otherwise nothing."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, FullyShardedStrategy):
            strategy.shard(self.detector, self.device_mesh["data_parallel"])

    def configure_optimizers(self) -> dict[str, Any] | tuple[list, list]:
        optimizer = build_optimizer(self.detector, self.optimizer_cfg)
        schedulers = build_schedulers(optimizer, self.scheduler_cfg)
        return [optimizer], schedulers
