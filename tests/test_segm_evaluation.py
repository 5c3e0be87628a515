"""Mask AP (``segm``) equals pycocotools' COCOeval on a fixture with known masks (all 12 numbers), ranks by the mask
score, leaves the box keys unchanged, and syncs over 2 gloo ranks to exactly the single-process numbers."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import torch
import torch.distributed as dist
from distributed_support import run_ranks
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from codetr.evaluation import CocoEvaluator
from codetr.utils.rle import decode, encode

SIZE = (120, 160)  # h, w
# polygons (x, y, ...) of small / medium / large objects in two images
POLYGONS = {
    1: [(1, [10, 10, 40, 12, 36, 44, 12, 40]), (2, [60, 20, 150, 30, 140, 110, 70, 100]),
        (1, [100, 5, 106, 5, 106, 12, 100, 12])],
    2: [(1, [5, 60, 90, 62, 85, 115, 8, 110]), (2, [120, 10, 150, 14, 146, 40, 118, 36])],
}
NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs@100", "ARm@100", "ARl@100"]


def polygon_mask(poly: list[float]) -> np.ndarray:
    import pycocotools.mask as mask_utils

    rles = mask_utils.frPyObjects([list(map(float, poly))], *SIZE)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def ground_truth(tmp_path):
    images = [{"id": i, "width": SIZE[1], "height": SIZE[0], "file_name": f"{i}.png"} for i in POLYGONS]
    anns, next_id = [], 1
    for image_id, objects in POLYGONS.items():
        for category, poly in objects:
            mask = polygon_mask(poly)
            ys, xs = np.nonzero(mask)
            anns.append({"id": next_id, "image_id": image_id, "category_id": category, "segmentation": [poly],
                         "area": float(mask.sum()), "bbox": [float(xs.min()), float(ys.min()),
                                                              float(xs.max() - xs.min() + 1),
                                                              float(ys.max() - ys.min() + 1)], "iscrowd": 0})
            next_id += 1
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path


def detections() -> dict[int, dict]:
    """Per image: GT masks shifted / eroded by known amounts, a false positive, box scores that rank differently
    from the mask scores."""
    rng = np.random.default_rng(0)
    out = {}
    for image_id, objects in POLYGONS.items():
        masks, boxes, labels = [], [], []
        for shift, (category, poly) in enumerate(objects):
            mask = np.roll(polygon_mask(poly), shift + 1, axis=1)
            masks.append(mask)
            ys, xs = np.nonzero(mask)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
            labels.append(category - 1)
        wrong = np.zeros(SIZE, bool)
        wrong[80:110, 100:150] = True
        masks.append(wrong)
        boxes.append([100, 80, 150, 110])
        labels.append(0)
        count = len(masks)
        out[image_id] = {"boxes": torch.tensor(boxes, dtype=torch.float32),
                         "scores": torch.tensor(rng.uniform(0.3, 0.9, count), dtype=torch.float32),
                         "labels": torch.tensor(labels), "masks": [encode(m) for m in masks],
                         "mask_scores": torch.tensor(rng.uniform(0.3, 0.9, count), dtype=torch.float32)}
    return out


def reference_stats(gt_path, results_path, iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(results_path))
        evaluator = COCOeval(gt, dt, iou_type)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def test_mask_ap_equals_pycocotools_and_the_box_keys_stay(tmp_path):
    path = ground_truth(tmp_path)
    evaluator = CocoEvaluator(path, category_ids=[1, 2], segm=True)
    for image_id, det in detections().items():
        evaluator.update([image_id], [det])
    ours = evaluator.compute()
    evaluator.write_results(tmp_path / "results.json")
    segm = reference_stats(path, tmp_path / "results_segm.json", "segm")
    boxes = reference_stats(path, tmp_path / "results.json", "bbox")
    for index, key in enumerate(NAMES):
        assert abs(ours[f"segm_{key}"] - segm[index]) < 1e-6, key
        assert abs(ours[key] - boxes[index]) < 1e-6, key
    assert 0 < ours["segm_AP"] < 1 and ours["segm_AP"] != ours["AP"]
    written = json.loads((tmp_path / "results_segm.json").read_text())
    assert {round(r["score"], 5) for r in written} == {round(float(s), 5) for d in detections().values()
                                                       for s in d["mask_scores"]}  # ranked by the mask score
    first = written[0]
    assert decode(first["segmentation"]).shape == SIZE
    assert evaluator.segm_details.to_dict()["per_class"]


def _ddp_worker(rank, world, init_file, gt_path, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        evaluator = CocoEvaluator(gt_path, category_ids=[1, 2], segm=True)
        dets = detections()
        if rank == 0:
            evaluator.update([1], [dets[1]])
        else:
            evaluator.update([2], [dets[2]])
            evaluator.update([1], [dets[2]])  # the sampler's padding: a copy of image 1 with other detections
        results[rank] = evaluator.compute()
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_mask_ap(tmp_path):
    path = ground_truth(tmp_path)
    single = CocoEvaluator(path, category_ids=[1, 2], segm=True)
    for image_id, det in detections().items():
        single.update([image_id], [det])
    expected = single.compute()
    results = run_ranks(_ddp_worker, tmp_path, path, timeout=120)
    assert results[0] == expected and results[1] == expected
