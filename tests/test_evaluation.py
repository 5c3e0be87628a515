"""Box AP equals pycocotools' COCOeval on a hand-made case; LVIS mode runs on a tiny LVIS-style json."""

import contextlib
import io
import json

import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from codetr.evaluation import CocoEvaluator


def ground_truth(tmp_path, lvis=False):
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.jpg"} for i in (1, 2)]
    if lvis:
        for image in images:
            image.update(not_exhaustive_category_ids=[], neg_category_ids=[2])
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [50, 50, 20, 40], "area": 800, "iscrowd": 0},
        {"id": 3, "image_id": 2, "category_id": 1, "bbox": [5, 60, 60, 30], "area": 1800, "iscrowd": 0},
    ]
    cats = [{"id": 1, "name": "a", "frequency": "f"}, {"id": 2, "name": "b", "frequency": "r"}]
    path = tmp_path / "gt.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return path


DETECTIONS = {
    1: {"boxes": torch.tensor([[12.0, 11.0, 41.0, 42.0], [50.0, 52.0, 70.0, 88.0], [0.0, 0.0, 20.0, 20.0]]),
        "scores": torch.tensor([0.9, 0.6, 0.7]), "labels": torch.tensor([0, 1, 0])},
    2: {"boxes": torch.tensor([[5.0, 62.0, 60.0, 90.0], [30.0, 30.0, 60.0, 60.0]]),
        "scores": torch.tensor([0.8, 0.3]), "labels": torch.tensor([0, 1])},
}


def test_ap_equals_pycocotools(tmp_path):
    path = ground_truth(tmp_path)
    evaluator = CocoEvaluator(path, category_ids=[1, 2])
    for image_id, det in DETECTIONS.items():
        evaluator.update([image_id], [det])
    ours = evaluator.compute(results_file=tmp_path / "results.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        dt = gt.loadRes(str(tmp_path / "results.json"))
        reference = COCOeval(gt, dt, "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    for index, key in enumerate(["AP", "AP50", "AP75", "APs", "APm", "APl"]):
        assert abs(ours[key] - reference.stats[index]) < 1e-6, key
    assert 0 < ours["AP"] < 1


def test_lvis_mode_reports_frequency_groups(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path, lvis=True), category_ids=[1, 2], lvis=True)
    for image_id, det in DETECTIONS.items():
        evaluator.update([image_id], [det])
    metrics = evaluator.compute()
    assert {"AP", "APr", "APc", "APf"} <= set(metrics)


def test_no_detections_gives_zero_ap(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path))
    evaluator.update([1], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}])
    assert evaluator.compute()["AP"] == 0.0
