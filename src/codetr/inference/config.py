"""A :class:`Detector` for the Hydra entry points (``predict``, ``evaluate`` with TTA): from the checkpoint's own
description when it has one, else from the composed config (``experiment=...``), with class names from the first
of: ``class_names`` in the config, the checkpoint, the dataset's annotation json, class indices."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from codetr.checkpoint_io import load_detector_weights, load_weights_file
from codetr.inference.description import MissingDescriptionError, describe, read_description
from codetr.inference.detector import Detector, build_model
from codetr.inference.tta import TTAConfig

log = logging.getLogger(__name__)


def pick_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dataset_class_names(cfg: Any) -> list[str] | None:
    """Category names (sorted by id) from the configured annotation file, when it exists."""
    from codetr.data.coco import read_coco_json

    node = cfg.get("data", {}).get("datamodule", {}) if cfg.get("data") else {}
    for key in ("val_annotations", "train_annotations", "test_annotations"):
        path = node.get(key) if node else None
        if path and Path(path).is_file():
            categories = sorted(read_coco_json(path)["categories"], key=lambda c: c["id"])
            return [str(c.get("name", c["id"])) for c in categories]
    return None


def detector_from_config(cfg: Any) -> Detector:
    """``cfg``: a composed ``predict`` / ``evaluate`` config (``ckpt_path``, ``use_ema``, optional ``device``,
    ``tta``, ``class_names``, ``eval_module``)."""
    device = pick_device(cfg.get("device"))
    tta = TTAConfig.from_mapping(cfg.get("tta"))
    checkpoint = load_weights_file(cfg.ckpt_path)
    try:
        description = read_description(checkpoint, cfg.ckpt_path)
    except MissingDescriptionError:
        log.info("%s does not describe its model: building it from the config", cfg.ckpt_path)
        description = describe(cfg)
    model = build_model(description)
    load_detector_weights(model, checkpoint, prefer_ema=cfg.get("use_ema", True), source=str(cfg.ckpt_path))
    saved_names = (checkpoint.get("hyper_parameters") or {}).get("class_names")
    names = cfg.get("class_names") or description.class_names or saved_names or dataset_class_names(cfg)
    description.class_names = [str(n) for n in names] if names else None
    if description.class_names is None:
        log.info("no class names (config, checkpoint or dataset json): labels are shown as class indices")
    elif len(description.class_names) != description.num_classes:
        raise ValueError(f"{len(description.class_names)} class names for a model of {description.num_classes} "
                         f"classes: {description.class_names}")
    return Detector(model, description, device=device, tta=tta, eval_module=cfg.get("eval_module"))
