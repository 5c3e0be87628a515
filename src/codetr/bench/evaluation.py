"""COCO box AP on 5,000 images x 300 detections: codetr's evaluator (faster-coco-eval) vs pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from codetr.bench.timing import Measurement, peak_rss_mib
from codetr.evaluation import CocoEvaluator


def synthetic(root: Path, images: int, detections: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    gt_images, anns, results = [], [], []
    for i in range(1, images + 1):
        gt_images.append({"id": i, "width": 640, "height": 480, "file_name": f"{i}.jpg"})
        boxes = np.column_stack([rng.uniform(0, 500, 7), rng.uniform(0, 380, 7), rng.uniform(10, 140, (7, 2))])
        labels = rng.integers(1, 81, 7)
        for box, label in zip(boxes, labels):
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": int(label), "bbox": box.tolist(),
                         "area": float(box[2] * box[3]), "iscrowd": 0})
        jitter = boxes[rng.integers(0, 7, detections)] + rng.normal(0, 8, (detections, 4))
        jitter[:, 2:] = np.abs(jitter[:, 2:]) + 1
        results.append((i, jitter, rng.uniform(0, 1, detections), rng.integers(0, 80, detections)))
    categories = [{"id": k, "name": str(k)} for k in range(1, 81)]
    path = root / "gt.json"
    path.write_text(json.dumps({"images": gt_images, "annotations": anns, "categories": categories}))
    return path, results


def run(device: str = "cpu", repeats: int = 1, images: int = 5000, detections: int = 300) -> list[Measurement]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, results = synthetic(Path(tmp), images, detections)
        params = {"images": images, "detections_per_image": detections}
        ours_times, reference_times = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            evaluator = CocoEvaluator(gt_path, max_detections=detections)
            for image_id, boxes, scores, labels in results:
                xyxy = torch.as_tensor(np.column_stack([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]]),
                                       dtype=torch.float32)
                evaluator.update([image_id], [{"boxes": xyxy, "scores": torch.as_tensor(scores),
                                               "labels": torch.as_tensor(labels)}])
            ours = evaluator.compute()
            evaluator.write_results(Path(tmp) / "results.json")
            ours_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                gt = COCO(str(gt_path))
                dt = gt.loadRes(str(Path(tmp) / "results.json"))
                reference = COCOeval(gt, dt, "bbox")
                reference.evaluate()
                reference.accumulate()
                reference.summarize()
            reference_times.append(time.perf_counter() - start)
        row = Measurement("codetr evaluator (faster-coco-eval)", params, ours_times, peak_rss_mib())
        row.extra = {"AP": round(ours["AP"], 4)}
        rows.append(row)
        ref = Measurement("pycocotools COCOeval", params, reference_times, peak_rss_mib())
        ref.extra = {"AP": round(float(reference.stats[0]), 4),
                     "speedup_codetr": round(min(reference_times) / min(ours_times), 2)}
        rows.append(ref)
    return rows
