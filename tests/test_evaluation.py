"""Box AP equals pycocotools' COCOeval on a hand-made case (AR named by detection budget, per-class AP, PR curves);
LVIS mode on a tiny LVIS-style json; the torchmetrics state syncs over 2 gloo ranks with padded duplicates counted
once."""

import contextlib
import io
import json

import pytest
import torch
import torch.distributed as dist
from distributed_support import run_ranks
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
    ours = evaluator.compute()
    evaluator.write_results(tmp_path / "results.json")
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(path))
        dt = gt.loadRes(str(tmp_path / "results.json"))
        reference = COCOeval(gt, dt, "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    names = ["AP", "AP50", "AP75", "APs", "APm", "APl", "AR@1", "AR@10", "AR@100", "ARs@100", "ARm@100", "ARl@100"]
    for index, key in enumerate(names):
        assert abs(ours[key] - reference.stats[index]) < 1e-6, key
    assert sorted(ours) == sorted(names)  # no bare "AR": COCO's summary calls AR@1 "AR_all"
    assert 0 < ours["AP"] < 1 and ours["APl"] == -1.0  # no large object in the ground truth


def test_ar_at_each_budget_differs_when_the_budget_binds(tmp_path):
    """Image 1 has two objects; with its best-scored detection a miss, AR@1 < AR@10 = AR@100."""
    evaluator = CocoEvaluator(ground_truth(tmp_path), category_ids=[1, 2])
    missing_first = {"boxes": torch.tensor([[0.0, 0.0, 5.0, 5.0], [10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 70.0, 90.0]]),
                     "scores": torch.tensor([0.99, 0.9, 0.8]), "labels": torch.tensor([0, 0, 1])}
    evaluator.update([1, 2], [missing_first, DETECTIONS[2]])
    metrics = evaluator.compute()
    assert metrics["AR@1"] < metrics["AR@10"] == pytest.approx(metrics["AR@100"])
    assert metrics["AR@100"] > 0.9


def test_per_class_ap_and_precision_recall_curves(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path), category_ids=[1, 2])
    perfect_b = {"boxes": torch.tensor([[50.0, 50.0, 70.0, 90.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([1])}
    evaluator.update([1, 2], [perfect_b, DETECTIONS[2]])
    evaluator.compute()
    rows = evaluator.details.sorted_per_class()
    assert [(r["name"], r["category_id"], r["num_gt"]) for r in rows] == [("b", 2, 1), ("a", 1, 2)]
    assert rows[0]["AP"] == pytest.approx(1.0) and 0 < rows[1]["AP"] < 1  # "a": one of two objects found
    curves = evaluator.details.to_dict()["pr_curves"]
    assert len(curves["recall"]) == len(curves["AP50"]) == len(curves["AP75"]) == len(curves["AP"]) == 101
    assert curves["AP50"][0] == pytest.approx(1.0)


def test_lvis_mode_reports_frequency_groups(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path, lvis=True), category_ids=[1, 2], lvis=True)
    for image_id, det in DETECTIONS.items():
        evaluator.update([image_id], [det])
    metrics = evaluator.compute()
    assert {"AP", "APr", "APc", "APf", "AR@300", "ARs@300", "ARm@300", "ARl@300"} == set(metrics) - {
        "AP50", "AP75", "APs", "APm", "APl"}


def test_no_detections_gives_zero_ap(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path))
    evaluator.update([1], [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0),
                            "labels": torch.zeros(0, dtype=torch.long)}])
    assert evaluator.compute()["AP"] == 0.0


def test_results_file_holds_coco_entries_in_original_frame(tmp_path):
    evaluator = CocoEvaluator(ground_truth(tmp_path), category_ids=[1, 2])
    evaluator.update([2], [DETECTIONS[2]])
    evaluator.compute()
    evaluator.write_results(tmp_path / "out.json")
    entries = json.loads((tmp_path / "out.json").read_text())
    assert [(e["image_id"], e["bbox"], e["category_id"]) for e in entries] == [
        (2, [5.0, 62.0, 55.0, 28.0], 1), (2, [30.0, 30.0, 30.0, 30.0], 2)]  # xyxy -> xywh, label -> category id
    assert [e["score"] for e in entries] == pytest.approx([0.8, 0.3])


def _ddp_worker(rank, world, init_file, gt_path, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        evaluator = CocoEvaluator(gt_path, category_ids=[1, 2])
        # rank 0 sees image 1, rank 1 sees image 2 and (DistributedSampler padding) image 1 again, with other
        # detections: the copy seen first (rank 0's) counts, once
        repeated = {"boxes": torch.tensor([[0.0, 0.0, 9.0, 9.0]]), "scores": torch.ones(1),
                    "labels": torch.zeros(1).long()}
        if rank == 0:
            evaluator.update([1], [DETECTIONS[1]])
        else:
            evaluator.update([2], [DETECTIONS[2]])
            evaluator.update([1], [repeated])
        metrics = evaluator.compute()
        results[rank] = (metrics, evaluator.results, evaluator.details.to_dict())
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_single_process_ap_and_count_repeated_images_once(tmp_path):
    path = ground_truth(tmp_path)
    single = CocoEvaluator(path, category_ids=[1, 2])
    for image_id, det in DETECTIONS.items():
        single.update([image_id], [det])
    expected = single.compute()
    results = run_ranks(_ddp_worker, tmp_path, path, timeout=120)
    for rank in range(2):
        metrics, records, details = results[rank]
        assert metrics == expected
        assert len(records) == 5 and sorted(r["image_id"] for r in records) == [1, 1, 1, 2, 2]
        assert details == single.details.to_dict()


def test_lvis_federated_rules_ignore_unverified_categories(tmp_path):
    """A confident category-2 detection on image 2 (no category-2 object there) is a false positive only when
    image 2 lists category 2 as verified-negative; otherwise LVIS ignores it. Category 2 is rare: APr shows it."""
    perfect = {1: {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0], [50.0, 50.0, 70.0, 90.0]]),
                   "scores": torch.tensor([0.9, 0.5]), "labels": torch.tensor([0, 1])},
               2: {"boxes": torch.tensor([[5.0, 60.0, 65.0, 90.0], [30.0, 30.0, 60.0, 60.0]]),
                   "scores": torch.tensor([0.8, 0.95]), "labels": torch.tensor([0, 1])}}
    results = {}
    for negatives in ([], [2]):
        path = ground_truth(tmp_path, lvis=True)
        data = json.loads(path.read_text())
        data["images"][1]["neg_category_ids"] = negatives
        data["images"][0]["neg_category_ids"] = []
        path.write_text(json.dumps(data))
        evaluator = CocoEvaluator(path, category_ids=[1, 2], lvis=True)
        for image_id, det in perfect.items():
            evaluator.update([image_id], [det])
        results[len(negatives)] = evaluator.compute()
    assert results[0]["APr"] == pytest.approx(1.0) and results[0]["APf"] == pytest.approx(1.0)
    assert results[1]["APr"] < 0.9 and results[1]["APf"] == pytest.approx(1.0)
