"""Evaluation entry point: ``python -m codetr.evaluate experiment=<recipe> ckpt_path=<ckpt> [split=val|test]``.

Builds the data and the detector from the config, loads the weights (Lightning or converted official checkpoint,
``torch.load(weights_only=True)``), runs the split through the main head, prints the COCO / LVIS AP table and writes
``results.json`` (COCO result format: ``image_id``, ``category_id``, ``bbox`` xywh in original pixels, ``score``)
and ``metrics.json``.

With test-time augmentation (``tta=flip`` / ``tta=multiscale``, :mod:`codetr.inference.tta`) the split runs through
:class:`codetr.inference.Detector` in this one process (no Lightning trainer, no DDP): every original image is
seen at each view and the merged detections are scored.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.distributed as dist
from omegaconf import DictConfig

from codetr.train import build_datamodule, build_module, build_trainer, fetch_backbone_weights
from codetr.utils import check_targets
from codetr.utils.checkpoints import load_detector_weights
from codetr.utils.printing import print_metrics

log = logging.getLogger(__name__)


def coco_results(
    image_ids: Sequence[int], detections: Sequence[dict[str, torch.Tensor]], category_ids: Sequence[int] | None
) -> list[dict[str, Any]]:
    """COCO result records; ``boxes`` xyxy (original pixels) -> ``bbox`` xywh; labels mapped to category ids."""
    records = []
    for image_id, det in zip(image_ids, detections):
        boxes = det["boxes"].tolist()
        for (x1, y1, x2, y2), score, label in zip(boxes, det["scores"].tolist(), det["labels"].tolist()):
            category = int(category_ids[label]) if category_ids is not None else int(label)
            records.append({"image_id": int(image_id), "category_id": category,
                            "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return records


class RecordingEvaluator:
    """Forwards ``update`` / ``compute`` to an evaluator (or none) and keeps the detections for the results file;
    under DDP the records of all ranks are gathered on ``results()``."""

    def __init__(self, evaluator: Any | None, category_ids: Sequence[int] | None):
        self.evaluator, self.category_ids = evaluator, category_ids
        self.records: list[dict[str, Any]] = []

    def update(self, image_ids: Sequence[int], detections: Sequence[dict[str, torch.Tensor]]) -> None:
        if self.evaluator is not None:
            self.evaluator.update(image_ids, detections)
        self.records.extend(coco_results(image_ids, detections, self.category_ids))

    def compute(self) -> dict[str, float]:
        return dict(self.evaluator.compute()) if self.evaluator is not None else {}

    def results(self) -> list[dict[str, Any]]:
        if dist.is_available() and dist.is_initialized():
            gathered: list[list[dict[str, Any]]] = [[] for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, self.records)
            return [record for part in gathered for record in part]
        return self.records


def evaluate_with_tta(cfg: DictConfig, datamodule: Any, stage: str) -> tuple[dict[str, float], list[dict]]:
    """AP of the TTA-merged detections over the split's original images (unreadable images skipped, counted)."""
    from codetr.inference.config import detector_from_config

    split = "test" if stage == "test" else "val"
    dataset = datamodule.datasets[split]
    detector = detector_from_config(cfg)
    recorder = RecordingEvaluator(datamodule.evaluator(stage), getattr(datamodule, "category_ids", None))
    batch_size, unreadable = int(cfg.data.datamodule.get("val_batch_size", 1) or 1), 0
    for start in range(0, len(dataset), batch_size):
        samples = []
        for index in range(start, min(start + batch_size, len(dataset))):
            try:
                samples.append(dataset.load(index))
            except (OSError, ValueError, SyntaxError) as error:
                unreadable += 1
                log.warning("skipping %s: %s", dataset.image_path(dataset.images[index]), error)
        if samples:
            images = [s["image"].as_subclass(torch.Tensor) for s in samples]
            found = detector.detect(images, detector.tta, cfg.get("precision"))
            recorder.update([s["image_id"] for s in samples], found)
    if unreadable:
        log.warning("%d unreadable images were not evaluated", unreadable)
    return recorder.compute(), recorder.results()


def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_targets(cfg)
    fetch_backbone_weights(cfg)  # ckpt_path holds every weight: no pretrained backbone file is looked for
    datamodule = build_datamodule(cfg)
    stage = "test" if cfg.split == "test" else "validate"
    datamodule.setup(stage)
    split = "test" if stage == "test" else "val"
    if cfg.get("tta"):
        metrics, records = evaluate_with_tta(cfg, datamodule, stage)
        write_outputs(cfg, metrics, records, split, f"{cfg.ckpt_path}, TTA")
        return metrics
    module = build_module(cfg, datamodule)
    load_detector_weights(module.detector, cfg.ckpt_path, prefer_ema=cfg.use_ema, same_classes=True)
    recorders: dict[str, RecordingEvaluator] = {}

    def factory(split: str) -> RecordingEvaluator:
        inner = datamodule.evaluator(split) if hasattr(datamodule, "evaluator") else None
        recorders[split] = RecordingEvaluator(inner, getattr(datamodule, "category_ids", None))
        return recorders[split]

    module.evaluator_factory = factory
    trainer = build_trainer(cfg)
    if stage == "test":
        trainer.test(module, datamodule=datamodule)
    else:
        trainer.validate(module, datamodule=datamodule)
    metrics = dict(getattr(module, "last_metrics", {}) or {})
    records = recorders[split].results() if split in recorders else []
    if trainer.is_global_zero:
        write_outputs(cfg, metrics, records, split, str(cfg.ckpt_path))
    return metrics


def write_outputs(cfg: DictConfig, metrics: dict[str, float], records: list[dict], split: str, title: str) -> None:
    for path, payload in ((cfg.results_file, records), (cfg.metrics_file, metrics)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload))
    print_metrics(metrics, title=f"{split} box AP ({title})")
    log.info("wrote %d detections to %s", len(records), cfg.results_file)


@hydra.main(version_base="1.3", config_path="pkg://codetr.conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    metrics = evaluate(cfg)
    return metrics.get("AP")


if __name__ == "__main__":
    main()
