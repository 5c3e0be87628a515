"""COCO and LVIS box AP (and, with ``segm``, mask AP) as a ``torchmetrics.Metric``: faster-coco-eval inside (numbers
identical to pycocotools / the LVIS API), state kept and synchronised across DDP ranks by torchmetrics.

Mask AP: detections carry ``masks`` (COCO RLE dicts at the original image size, encoded on the rank that made them:
:func:`codetr.utils.rle.paste_and_encode`) and ``mask_scores`` (the ranking score of segmentation results); the RLE
bytes travel as flat tensors (:mod:`codetr.utils.rle`). Its metrics are the box ones prefixed ``segm_``
(``segm_AP``, ``segm_AP50``, ... ``segm_AR@100``); the box keys are unchanged.

Detections come in the original image frame (``xyxy`` pixels) with contiguous labels; they are converted to
COCO results (``xywh``, category ids) and evaluated against the original annotation file. Lightning's
distributed sampler pads the last batches with repeated images so every rank gets as many; each image is
counted once (the copy seen first, by the rank-major order of ``update`` calls).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from faster_coco_eval import COCO, COCOeval_faster
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from codetr.data.annotations import load_json
from codetr.evaluation.summary import (
    AP_KEYS,
    NO_OBJECTS,
    EvaluationDetails,
    evaluation_details,
    recall_metrics,
)
from codetr.utils.rle import pack, unpack

log = logging.getLogger(__name__)

# Every metric name an evaluation returns, in display order (``AR@<budget>`` after the budgets actually used).
COCO_METRICS = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "AR@1",
    "AR@10",
    "AR@100",
    "ARs@100",
    "ARm@100",
    "ARl@100",
)
LVIS_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")


def contradicting_areas(annotations: Sequence[dict]) -> list[str]:
    """Annotations whose json ``area`` cannot belong to their box: not positive for a box of positive size, or
    larger than the box (a mask lies inside its box). COCO evaluation bins objects into small / medium / large by
    that ``area``, not by the box, so such entries move between APs / APm / APl (area 0 makes a large object
    "small"). Returned as ``"id N: area A for a W x H box"``."""
    found = []
    for ann in annotations:
        if not isinstance(ann, dict) or ann.get("iscrowd", 0):
            continue
        box, area = ann.get("bbox"), ann.get("area")
        if not (isinstance(box, list | tuple) and len(box) == 4) or not isinstance(area, int | float):
            continue
        try:
            width, height = float(box[2]), float(box[3])
        except (TypeError, ValueError):
            continue
        if not (width > 0 and height > 0):
            continue
        if area <= 0 or area > width * height * 1.01 + 1.0:
            found.append(f"id {ann.get('id', '?')}: area {area:g} for a {width:g} x {height:g} box")
    return found


def warn_contradicting_areas(annotations: Sequence[dict], path: str | Path) -> None:
    found = contradicting_areas(annotations)
    if found:
        log.warning("%s: %d annotation(s) have an 'area' that contradicts their box (%s%s); the COCO size ranges "
                    "(APs / APm / APl) use the json area as the COCO tools do: fix the file if that is not meant",
                    path, len(found), "; ".join(found[:5]), " ..." if len(found) > 5 else "")


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class CocoEvaluator(Metric):
    """Accumulates detections (``update``) and computes box AP (``compute``), over every DDP rank.

    Args:
        annotation_file: ground-truth COCO / LVIS json, or gzipped json (original annotations).
        category_ids: contiguous label -> category id (the dataset's ``category_ids``); default: sorted
            json ids.
        lvis: LVIS rules (federated negatives / not-exhaustive categories, APr/APc/APf, 300 detections
            per image).
        max_detections: detections per image kept for evaluation (COCO 100 by protocol; LVIS 300).

    State (1-D tensors, concatenated across ranks by torchmetrics): per image seen, a key unique over ranks
    (``local index * world + rank``) and its id; per detection, its image's key, ``xyxy`` box (4 values),
    score and label. After ``compute``, :attr:`results` holds the COCO result records (``bbox`` xywh,
    ``category_id``) and :attr:`details` the per-class AP and precision-recall curves.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(
        self,
        annotation_file: str | Path,
        category_ids: Sequence[int] | None = None,
        lvis: bool = False,
        max_detections: int | None = None,
        segm: bool = False,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.annotation_file = Path(annotation_file)
        if not self.annotation_file.is_file():
            raise FileNotFoundError(f"annotation file not found: {self.annotation_file}")
        self.lvis = lvis
        self.max_detections = max_detections or (300 if lvis else 100)
        self._category_ids = list(category_ids) if category_ids is not None else None
        self.segm = segm
        states = ["sample_keys", "sample_ids", "det_keys", "det_labels", "det_boxes", "det_scores"]
        if segm:
            states += ["seg_keys", "seg_labels", "seg_scores", "seg_bytes", "seg_lengths", "seg_sizes"]
        for name in states:
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.results: list[dict[str, Any]] = []
        self.segm_results: list[dict[str, Any]] = []
        self.details = EvaluationDetails()
        self.segm_details = EvaluationDetails()

    def category_ids(self, gt: COCO) -> list[int]:
        return self._category_ids or sorted(gt.getCatIds())

    def _num_samples(self) -> int:
        return sum(len(keys) for keys in self.sample_keys)

    def update(self, image_ids: Sequence[int], detections: Sequence[dict[str, Tensor]]) -> None:
        """``detections``: per image ``{boxes (N, 4) xyxy original pixels, scores (N,), labels (N,)}``; the
        ``max_detections`` highest scores of each image are kept."""
        rank, world = _rank_and_world()
        first = self._num_samples()
        keys = torch.arange(first, first + len(image_ids), dtype=torch.long) * world + rank
        det_keys, boxes, scores, labels = [], [], [], []
        for key, det in zip(keys.tolist(), detections):
            order = det["scores"].argsort(descending=True)[: self.max_detections]
            det_keys.append(torch.full((len(order),), key, dtype=torch.long))
            boxes.append(det["boxes"][order].float().reshape(-1))
            scores.append(det["scores"][order].float())
            labels.append(det["labels"][order].long())
        device = self.device
        self.sample_keys.append(keys.to(device))
        self.sample_ids.append(torch.as_tensor([int(i) for i in image_ids], dtype=torch.long, device=device))
        self.det_keys.append(
            torch.cat(det_keys).to(device) if det_keys else torch.zeros(0, dtype=torch.long, device=device)
        )
        self.det_boxes.append(torch.cat(boxes).to(device) if boxes else torch.zeros(0, device=device))
        self.det_scores.append(torch.cat(scores).to(device) if scores else torch.zeros(0, device=device))
        self.det_labels.append(
            torch.cat(labels).to(device) if labels else torch.zeros(0, dtype=torch.long, device=device)
        )
        if self.segm:
            self._update_masks(keys.tolist(), detections)

    def _update_masks(self, keys: list[int], detections: Sequence[dict[str, Tensor]]) -> None:
        """The ``max_detections`` best masks of each image by mask score, their RLE packed into tensors."""
        seg_keys, labels, scores, rles = [], [], [], []
        for key, det in zip(keys, detections):
            if "masks" not in det:
                raise ValueError("mask AP needs detections with 'masks' (RLE) and 'mask_scores'")
            mask_scores = det.get("mask_scores", det["scores"]).float()
            order = mask_scores.argsort(descending=True)[: self.max_detections].tolist()
            seg_keys.append(torch.full((len(order),), key, dtype=torch.long))
            labels.append(det["labels"][order].long())
            scores.append(mask_scores[order])
            rles.extend(det["masks"][i] for i in order)
        data, lengths, sizes = pack(rles)
        device = self.device
        self.seg_keys.append(torch.cat(seg_keys).to(device) if seg_keys else torch.zeros(0, dtype=torch.long,
                                                                                          device=device))
        self.seg_labels.append(torch.cat(labels).to(device) if labels else torch.zeros(0, dtype=torch.long,
                                                                                      device=device))
        self.seg_scores.append(torch.cat(scores).to(device) if scores else torch.zeros(0, device=device))
        self.seg_bytes.append(data.to(device))
        self.seg_lengths.append(lengths.to(device))
        self.seg_sizes.append(sizes.reshape(-1).to(device))

    def _unique_detections(self) -> tuple[list[int], Tensor, Tensor, Tensor, Tensor]:
        """Image ids seen (sorted) and the detections of each image's first copy: ``image_ids, (N, 4) xyxy
        boxes, scores, labels`` (CPU)."""
        if len(self.sample_keys) == 0:  # a list before the DDP sync, a tensor after it
            return (
                [],
                torch.zeros(0, 4),
                torch.zeros(0),
                torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long),
            )
        keys, ids = dim_zero_cat(self.sample_keys).long().cpu(), dim_zero_cat(self.sample_ids).long().cpu()
        first: dict[int, int] = {}
        for key, image_id in sorted(zip(keys.tolist(), ids.tolist())):
            first.setdefault(image_id, key)
        key_to_image = {key: image_id for image_id, key in first.items()}
        det_keys = dim_zero_cat(self.det_keys).long().cpu()
        keep = torch.isin(det_keys, torch.tensor(sorted(key_to_image), dtype=torch.long))
        det_image_ids = torch.tensor([key_to_image[k] for k in det_keys[keep].tolist()], dtype=torch.long)
        boxes = dim_zero_cat(self.det_boxes).float().cpu().reshape(-1, 4)[keep]
        scores = dim_zero_cat(self.det_scores).float().cpu()[keep]
        labels = dim_zero_cat(self.det_labels).long().cpu()[keep]
        return sorted(first), boxes, scores, labels, det_image_ids

    def _first_copies(self) -> dict[int, int]:
        """Sample key of the first copy of every image id seen (rank-major order)."""
        keys, ids = dim_zero_cat(self.sample_keys).long().cpu(), dim_zero_cat(self.sample_ids).long().cpu()
        first: dict[int, int] = {}
        for key, image_id in sorted(zip(keys.tolist(), ids.tolist())):
            first.setdefault(image_id, key)
        return {key: image_id for image_id, key in first.items()}

    def _unique_masks(self) -> tuple[list[int], Tensor, Tensor, list[dict]]:
        """(image id, score, label, RLE) of every kept mask of each image's first copy."""
        if len(self.sample_keys) == 0 or len(self.seg_keys) == 0:
            return [], torch.zeros(0), torch.zeros(0, dtype=torch.long), []
        key_to_image = self._first_copies()
        seg_keys = dim_zero_cat(self.seg_keys).long().cpu()
        rles = unpack(dim_zero_cat(self.seg_bytes).cpu(), dim_zero_cat(self.seg_lengths).long().cpu(),
                      dim_zero_cat(self.seg_sizes).long().cpu().reshape(-1, 2))
        keep = torch.isin(seg_keys, torch.tensor(sorted(key_to_image), dtype=torch.long))
        rows = torch.nonzero(keep).view(-1).tolist()
        image_ids = [key_to_image[k] for k in seg_keys[keep].tolist()]
        return (image_ids, dim_zero_cat(self.seg_scores).float().cpu()[keep],
                dim_zero_cat(self.seg_labels).long().cpu()[keep], [rles[i] for i in rows])

    def _load_gt(self) -> COCO:
        """The ground truth (``.json`` or gzipped), refused when annotation ids repeat: COCO indexes
        annotations by id, so a duplicate silently replaces another box and changes AP."""
        data = load_json(self.annotation_file)
        with contextlib.redirect_stdout(io.StringIO()):
            gt = COCO(data)
        if len(gt.anns) != len(data.get("annotations", [])):
            counts = Counter(ann.get("id") for ann in data["annotations"])
            repeated = sorted((i for i, n in counts.items() if n > 1), key=str)
            raise ValueError(
                f"{self.annotation_file}: annotation ids repeat ({len(repeated)} ids, e.g. "
                f"{repeated[:5]}); COCO evaluation needs unique ids"
            )
        if not getattr(self, "_areas_checked", False):
            self._areas_checked = True
            warn_contradicting_areas(data["annotations"], self.annotation_file)
        return gt

    def _empty_metrics(self) -> dict[str, float]:
        names = LVIS_METRICS + (f"AR@{self.max_detections}",) if self.lvis else COCO_METRICS
        return {name: 0.0 for name in names}

    def compute(self) -> dict[str, float]:
        """AP / AR metrics over the images seen by all ranks (every rank returns the same numbers); ``-1``
        where the range has no ground truth (e.g. ``APl`` without large objects)."""
        gt = self._load_gt()
        ids = self.category_ids(gt)
        image_ids, boxes, scores, labels, det_image_ids = self._unique_detections()
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)
        self.results = [
            {
                "image_id": image_id,
                "bbox": [round(v, 3) for v in box],
                "score": score,
                "category_id": int(ids[label]),
            }
            for image_id, box, score, label in zip(
                det_image_ids.tolist(), xywh.tolist(), scores.tolist(), labels.tolist()
            )
        ]
        self.details = EvaluationDetails()
        if not self.results:
            log.warning("no detections to evaluate: AP = 0")
            return self._empty_metrics()
        evaluator = self._run(gt, self.results, "bbox", image_ids)
        metrics = {AP_KEYS[k]: float(v) for k, v in evaluator.stats_as_dict.items() if k in AP_KEYS}
        metrics.update(recall_metrics(evaluator.eval["recall"], [int(m) for m in evaluator.params.maxDets]))
        names = {int(c["id"]): str(c.get("name", c["id"])) for c in gt.loadCats(gt.getCatIds())}
        num_gt = Counter(
            int(a["category_id"])
            for a in gt.loadAnns(gt.getAnnIds(imgIds=image_ids))
            if not a.get("iscrowd", 0)
        )
        self.details = evaluation_details(evaluator, names, num_gt)
        if self.segm:
            metrics.update(self._segm_metrics(gt, ids, image_ids, names, num_gt))
        return metrics

    def _run(self, gt: COCO, results: list[dict], iou_type: str, image_ids: list[int]) -> Any:
        with contextlib.redirect_stdout(io.StringIO()):
            dt = gt.loadRes([dict(r) for r in results])  # loadRes adds numpy fields to the entries it gets
            evaluator = COCOeval_faster(gt, dt, iouType=iou_type, lvis_style=self.lvis, print_function=lambda *a: None)
            evaluator.params.imgIds = image_ids
            if self.lvis:
                evaluator.params.maxDets = [self.max_detections]
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return evaluator

    def _segm_metrics(self, gt: COCO, ids: list[int], image_ids: list[int], names: dict[int, str],
                      num_gt: Counter) -> dict[str, float]:
        seg_images, scores, labels, rles = self._unique_masks()
        self.segm_results = [
            {"image_id": image_id, "segmentation": rle, "score": score, "category_id": int(ids[label])}
            for image_id, rle, score, label in zip(seg_images, rles, scores.tolist(), labels.tolist())
        ]
        self.segm_details = EvaluationDetails()
        if not self.segm_results:
            return {f"segm_{k}": v for k, v in self._empty_metrics().items()}
        evaluator = self._run(gt, self.segm_results, "segm", image_ids)
        metrics = {AP_KEYS[k]: float(v) for k, v in evaluator.stats_as_dict.items() if k in AP_KEYS}
        metrics.update(recall_metrics(evaluator.eval["recall"], [int(m) for m in evaluator.params.maxDets]))
        self.segm_details = evaluation_details(evaluator, names, num_gt)
        return {f"segm_{k}": v for k, v in metrics.items()}

    def write_results(self, path: str | Path) -> None:
        """Writes :attr:`results` (after ``compute``) as a COCO results json (rank 0 only under DDP); with mask AP
        also ``<stem>_segm.json``, the segmentation results (RLE)."""
        if _rank_and_world()[0] == 0:
            Path(path).write_text(json.dumps(self.results))
            if self.segm:
                path = Path(path)
                path.with_name(f"{path.stem}_segm{path.suffix}").write_text(json.dumps(self.segm_results))


__all__ = ["COCO_METRICS", "LVIS_METRICS", "NO_OBJECTS", "CocoEvaluator"]
