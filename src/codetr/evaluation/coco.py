"""COCO and LVIS box AP with faster-coco-eval (numbers identical to pycocotools / the LVIS API), correct under DDP.

Detections come in the original image frame (``xyxy`` pixels) with contiguous labels; they are converted to COCO
results (``xywh``, category ids) and evaluated against the original annotation file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster

from codetr.data.annotations import load_json

log = logging.getLogger(__name__)
COCO_KEYS = {"AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs", "AP_medium": "APm",
             "AP_large": "APl", "AR_all": "AR", "APr": "APr", "APc": "APc", "APf": "APf"}


class CocoEvaluator:
    """Accumulates detections and computes box AP.

    Args:
        annotation_file: ground-truth COCO / LVIS json, or gzipped json (original annotations).
        category_ids: contiguous label -> category id (the dataset's ``category_ids``); default: sorted json ids.
        lvis: LVIS rules (federated negatives / not-exhaustive categories, APr/APc/APf, 300 detections per image).
        max_detections: detections per image kept for evaluation (COCO 100 by protocol; LVIS 300).
    """

    def __init__(self, annotation_file: str | Path, category_ids: Sequence[int] | None = None, lvis: bool = False,
                 max_detections: int | None = None):
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.annotation_file}")
        self.lvis = lvis
        self.max_detections = max_detections or (300 if lvis else 100)
        self._category_ids = list(category_ids) if category_ids is not None else None
        self.results: dict[int, list[dict]] = {}

    def category_ids(self, gt: COCO) -> list[int]:
        return self._category_ids or sorted(gt.getCatIds())

    def reset(self) -> None:
        self.results = {}

    def update(self, image_ids: Sequence[int], detections: Sequence[dict[str, torch.Tensor]]) -> None:
        """``detections``: per image ``{boxes (N, 4) xyxy original pixels, scores (N,), labels (N,)}``."""
        for image_id, det in zip(image_ids, detections):
            per_image = self.results[int(image_id)] = []
            order = det["scores"].argsort(descending=True)[: self.max_detections]
            boxes = det["boxes"][order].float().cpu()
            xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1).tolist()
            for box, score, label in zip(xywh, det["scores"][order].tolist(), det["labels"][order].tolist()):
                per_image.append({"image_id": int(image_id), "bbox": [round(v, 3) for v in box],
                                  "score": float(score), "label": int(label)})

    def _gather(self) -> dict[int, list[dict]]:
        """Every rank's detections, one entry per image (a ``DistributedSampler`` pads the last batch with repeated
        images; their identical detections are counted once)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.results)
            merged: dict[int, list[dict]] = {}
            for part in gathered:
                for image_id, detections in part.items():
                    merged.setdefault(image_id, detections)
            return merged
        return self.results

    def coco_results(self, gt: COCO | None = None, per_image: dict[int, list[dict]] | None = None) -> list[dict]:
        """COCO result entries (``bbox`` xywh, ``category_id``) of all ranks' detections."""
        gt = gt or self._load_gt()
        ids = self.category_ids(gt)
        per_image = self._gather() if per_image is None else per_image
        return [{"image_id": r["image_id"], "bbox": r["bbox"], "score": r["score"], "category_id": int(ids[r["label"]])}
                for detections in per_image.values() for r in detections]

    def _load_gt(self) -> COCO:
        """The ground truth (``.json`` or gzipped), refused when annotation ids repeat: COCO indexes annotations by
        id, so a duplicate silently replaces another box and changes AP."""
        data = load_json(self.annotation_file)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(data)
        if len(gt.anns) != len(data.get("annotations", [])):
            counts = Counter(ann.get("id") for ann in data["annotations"])
            repeated = sorted((i for i, n in counts.items() if n > 1), key=str)
            raise ValueError(f"{self.annotation_file}: annotation ids repeat ({len(repeated)} ids, e.g. "
                             f"{repeated[:5]}); COCO evaluation needs unique ids")
        return gt

    def compute(self, results_file: str | Path | None = None) -> dict[str, float]:
        """AP metrics over the images seen by all ranks (every rank returns the same numbers)."""
        gt = self._load_gt()
        per_image = self._gather()
        results = self.coco_results(gt, per_image)
        image_ids = sorted(per_image)
        if results_file is not None and (not dist.is_initialized() or dist.get_rank() == 0):
            Path(results_file).write_text(json.dumps(results))
        if not results:
            log.warning("no detections to evaluate: AP = 0")
            return {v: 0.0 for k, v in COCO_KEYS.items() if self.lvis or k not in ("APr", "APc", "APf")}
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes(results)
            evaluator = COCOeval_faster(gt, dt, iouType="bbox", lvis_style=self.lvis, print_function=lambda *a: None)
            evaluator.params.imgIds = image_ids
            if self.lvis:
                evaluator.params.maxDets = [self.max_detections]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats_as_dict
        return {COCO_KEYS[k]: float(v) for k, v in stats.items() if k in COCO_KEYS}
