"""Prediction entry point: ``python -m codetr.predict experiment=<recipe> ckpt_path=<ckpt> input=<image|folder>``.

Runs the main head only (the detector in eval mode never touches the auxiliary heads) with the recipe's test-time
resizing, and writes under ``output_dir``: ``detections.json`` (per image: file, image_id, boxes xyxy in original
pixels, scores, labels, names) and, with ``save_images``, one PNG per image with the boxes above
``score_threshold`` and their class names (torchvision ``draw_bounding_boxes``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from codetr.data.coco import load_rgb
from codetr.train import build_module, build_trainer
from codetr.utils import check_targets, instantiate_checked
from codetr.utils.checkpoints import load_detector_weights
from codetr.visualize import draw_detections, save_png

log = logging.getLogger(__name__)


def class_names_from(cfg: DictConfig, datamodule: Any) -> list[str] | None:
    """Config ``class_names`` first, then the checkpoint's saved hyper-parameters, then the datamodule."""
    if cfg.get("class_names"):
        return list(cfg.class_names)
    try:
        checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
        names = checkpoint.get("hyper_parameters", {}).get("class_names")
        if names:
            return list(names)
    except (OSError, RuntimeError, AttributeError) as error:  # e.g. no hyper-parameters in a converted file
        log.debug("no class names in %s: %s", cfg.ckpt_path, error)
    names = getattr(datamodule, "class_names", None)
    return list(names) if names else None


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    check_targets(cfg)
    source = Path(cfg.input)
    if not source.exists():
        raise FileNotFoundError(f"input not found: {source}")
    datamodule = instantiate_checked(cfg.data.datamodule, predict_images=str(source))
    datamodule.setup("predict")
    module = build_module(cfg)
    load_detector_weights(module.detector, cfg.ckpt_path, prefer_ema=cfg.use_ema)
    names = class_names_from(cfg, datamodule)
    module.class_names = names
    trainer = build_trainer(cfg)
    batches = trainer.predict(module, datamodule=datamodule) or []
    files = list(datamodule.predict_files)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for detection in (d for batch in batches for d in batch):
        file = Path(files[detection["image_id"]])
        labels = detection["labels"].tolist()
        records.append({
            "file": str(file), "image_id": detection["image_id"], "boxes": detection["boxes"].tolist(),
            "scores": detection["scores"].tolist(), "labels": labels,
            "names": [names[k] if names and k < len(names) else str(k) for k in labels],
        })
        if cfg.save_images:
            image = load_rgb(file)  # same decoding as the dataset (EXIF orientation, RGB)
            drawn = draw_detections(image, detection["boxes"], detection["labels"], detection["scores"], names,
                                    cfg.score_threshold)
            save_png(drawn, out_dir / f"{file.stem}.png")
    (out_dir / "detections.json").write_text(json.dumps(records))
    log.info("%d images -> %s", len(records), out_dir)
    return records


@hydra.main(version_base="1.3", config_path="pkg://codetr.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
