"""Evaluation entry point: ``python -m codetr.evaluate experiment=<recipe> ckpt_path=<ckpt> [split=val|test]``.

Builds the data and the detector from the config, loads the weights (Lightning or converted official checkpoint,
``torch.load(weights_only=True)``), runs the split through the main head, prints the COCO / LVIS AP table and the
per-class AP table (best first) and writes ``results.json`` (COCO result format: ``image_id``, ``category_id``,
``bbox`` xywh in original pixels, ``score``), ``metrics.json`` (the metrics, ``per_class`` AP and ``pr_curves``) and
``pr_curves.png`` (precision-recall at IoU 0.50, 0.75 and averaged over 0.50:0.95, all classes). A model with a mask
branch adds mask AP: ``segm_*`` metrics beside the box ones, ``segm_per_class`` / ``segm_pr_curves`` in
``metrics.json``, ``results_segm.json`` (RLE segmentations) and ``pr_curves_segm.png``.

With test-time augmentation (``tta=flip`` / ``tta=multiscale``, :mod:`codetr.inference.tta`) the split runs through
:class:`codetr.inference.Detector` in this one process (no Lightning trainer, no DDP): every original image is
seen at each view and the merged detections are scored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from codetr.checkpoint_io import load_detector_weights
from codetr.evaluation.plots import plot_pr_curves
from codetr.lightning.module import evaluation_outputs
from codetr.train import build_datamodule, build_module, build_trainer, fetch_backbone_weights
from codetr.utils import check_targets, rle
from codetr.utils.logs import route_library_logs
from codetr.utils.printing import print_metrics, print_per_class

log = logging.getLogger(__name__)


def evaluate_with_tta(cfg: DictConfig, datamodule: Any, stage: str) -> dict[str, Any]:
    """AP of the TTA-merged detections over the split's original images (unreadable images skipped, counted);
    returns what :func:`write_outputs` takes (metrics, details, results)."""
    from codetr.inference.config import detector_from_config

    split = "test" if stage == "test" else "val"
    dataset = datamodule.datasets[split]
    detector = detector_from_config(cfg)
    evaluator = datamodule.evaluator(stage)
    if evaluator is None:
        raise ValueError(f"the {split} split has no annotation file to evaluate against (data.{split}_annotations)")
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
            if evaluator.segm:  # bitmaps at the original size -> RLE, as the evaluator keeps them
                found = [{**det, "masks": [rle.encode(mask) for mask in det["masks"]]} for det in found]
            evaluator.update([s["image_id"] for s in samples], found)
    if unreadable:
        log.warning("%d unreadable images were not evaluated", unreadable)
    return evaluation_outputs(split, evaluator.compute(), evaluator)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    check_targets(cfg)
    fetch_backbone_weights(cfg)  # ckpt_path holds every weight: no pretrained backbone file is looked for
    datamodule = build_datamodule(cfg)
    stage = "test" if cfg.split == "test" else "validate"
    datamodule.setup(stage)
    split = "test" if stage == "test" else "val"
    if cfg.get("tta"):
        evaluation = evaluate_with_tta(cfg, datamodule, stage)
        write_outputs(cfg, evaluation, split, f"{cfg.ckpt_path}, TTA")
        return evaluation["metrics"]
    module = build_module(cfg, datamodule)
    load_detector_weights(module.detector, cfg.ckpt_path, prefer_ema=cfg.use_ema, strict_classes=True)
    module.detector.eval_module = cfg.get("eval_module") or "detr"
    module.masks_from_boxes = bool(cfg.get("masks_from_boxes", False))
    trainer = build_trainer(cfg)
    if stage == "test":
        trainer.test(module, datamodule=datamodule)
    else:
        trainer.validate(module, datamodule=datamodule)
    evaluation = module.last_evaluation or {"metrics": {}, "details": None, "results": []}
    if trainer.is_global_zero:
        write_outputs(cfg, evaluation, split, str(cfg.ckpt_path))
    return dict(evaluation["metrics"])


def write_outputs(cfg: DictConfig, evaluation: dict[str, Any], split: str, title: str) -> None:
    """Prints the AP and per-class tables; writes the results json, the metrics json (with ``per_class`` and
    ``pr_curves``; mask AP: ``segm_per_class``, ``segm_pr_curves`` too) and the precision-recall image(s). Mask AP
    adds ``<results stem>_segm.json`` (RLE segmentations) and ``<pr_curves stem>_segm.png``."""
    metrics, results = evaluation["metrics"], evaluation["results"] or []
    payload: dict[str, Any] = dict(metrics)
    kinds = [("", "box", evaluation.get("details"), results)]
    if evaluation.get("segm_results") is not None:
        kinds.append(("segm_", "mask", evaluation["segm_details"], evaluation.get("segm_results") or []))
    for prefix, what, details, found in kinds:
        if details is None or not details.per_class:
            continue
        extra = details.to_dict()
        payload.update({f"{prefix}{key}": value for key, value in extra.items()})
        print_per_class(extra["per_class"], title=f"{split} per-class {what} AP ({title})")
        curves = _with_suffix(cfg.pr_curves_file, prefix)
        plot_pr_curves(details, curves, title=f"{split} {what} precision-recall, all classes")
        log.info("wrote the %s precision-recall curves to %s", what, curves)
    for prefix, _, _, found in kinds:
        path = _with_suffix(cfg.results_file, prefix)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(found))
        log.info("wrote %d %s to %s", len(found), "segmentations" if prefix else "detections", path)
    Path(cfg.metrics_file).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.metrics_file).write_text(json.dumps(payload))
    print_metrics(metrics, title=f"{split} {'box and mask' if len(kinds) > 1 else 'box'} AP ({title})")


def _with_suffix(path: str | Path, prefix: str) -> Path:
    """``results.json`` -> ``results_segm.json`` for the mask outputs (``prefix`` ``segm_``); unchanged for boxes."""
    path = Path(path)
    return path.with_name(f"{path.stem}_segm{path.suffix}") if prefix else path


@hydra.main(version_base="1.3", config_path="pkg://codetr.conf", config_name="evaluate")
def main(cfg: DictConfig) -> float | None:
    route_library_logs()  # Lightning's messages into Hydra's <run dir>/evaluate.log too
    metrics = evaluate(cfg)
    return metrics.get("AP")


if __name__ == "__main__":
    main()
