"""What a practitioner reads in W&B after each validation: per-class AP as a table and a bar chart, the
precision-recall curves as an image (box, and with a mask branch the same for mask AP), and the best value of the
monitored metric so far (``val/AP`` or ``val/segm_AP``) with its epoch in the run summary.

Reads :attr:`codetr.lightning.CoDETRModule.last_evaluation` (metrics, per-class AP, PR curves of the epoch's
evaluation); logs to every ``WandbLogger`` of the trainer, from rank 0. Checkpoints become W&B artifacts
through the logger itself (``logger.wandb.log_model``: ``true`` at the end, ``all`` at every save); the
learning rate per step comes from Lightning's ``LearningRateMonitor`` (``callbacks.lr_monitor``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from codetr.evaluation.plots import plot_pr_curves

PER_CLASS_COLUMNS = ("class", "category_id", "objects", "AP", "AP50", "AP75")


class WandbEvaluationDashboard(pl.Callback):
    """Per-class AP (``<stage>/per_class_AP`` table, ``<stage>/per_class_AP_bar`` chart),
    ``<stage>/pr_curves`` image (mask AP: ``<stage>/per_class_segm_AP``, ``..._bar``, ``<stage>/segm_pr_curves``)
    and, for validation, ``best/val_<metric>`` / ``best/epoch`` / ``best/step`` in the run summary.

    Args:
        monitor: the metric whose best value goes to the summary (``mode="max"``): ``AP``, ``segm_AP``, or the
            logged key (``val/AP``).
    """

    def __init__(self, monitor: str = "AP"):
        self.monitor = monitor.split("/", 1)[-1]
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_step: int | None = None

    @staticmethod
    def _wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
        return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]

    def _log(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        evaluation = getattr(pl_module, "last_evaluation", None)
        loggers = self._wandb_loggers(trainer)
        if not evaluation or not loggers or trainer.global_rank != 0 or trainer.sanity_checking:
            return
        import wandb

        stage, metrics = evaluation["stage"], evaluation["metrics"]
        payload: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as folder:  # wandb copies the images when they are logged
            for kind, details in (("", evaluation.get("details")), ("segm_", evaluation.get("segm_details"))):
                if details is None or not details.per_class:
                    continue
                what = "mask AP" if kind else "AP"
                rows = [
                    [r["name"], r["category_id"], r["num_gt"], r["AP"], r["AP50"], r["AP75"]]
                    for r in details.sorted_per_class()
                ]
                table = wandb.Table(columns=list(PER_CLASS_COLUMNS), data=rows)
                payload[f"{stage}/per_class_{kind}AP"] = table
                payload[f"{stage}/per_class_{kind}AP_bar"] = wandb.plot.bar(
                    table, "class", "AP", title=f"{stage} {what} per class (epoch {trainer.current_epoch})"
                )
                image = plot_pr_curves(
                    details,
                    Path(folder) / f"{kind}pr.png",
                    title=f"{stage} {what} precision-recall, epoch {trainer.current_epoch}",
                )
                payload[f"{stage}/{kind}pr_curves"] = wandb.Image(str(image))
            if payload:
                for logger in loggers:
                    logger.log_metrics(payload, step=trainer.global_step)
        value = metrics.get(self.monitor)
        if stage == "val" and value is not None and (self.best is None or value > self.best):
            self.best, self.best_epoch, self.best_step = (
                float(value),
                trainer.current_epoch,
                trainer.global_step,
            )
        if stage == "val" and self.best is not None:
            for logger in loggers:
                summary = logger.experiment.summary
                summary[f"best/val_{self.monitor}"] = self.best
                summary["best/epoch"] = self.best_epoch
                summary["best/step"] = self.best_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best, self.best_epoch = state_dict.get("best"), state_dict.get("best_epoch")
        self.best_step = state_dict.get("best_step")
