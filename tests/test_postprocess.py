"""Top-k decoding and class-aware linear soft-NMS."""

import torch

from codetr.models.postprocess import postprocess, soft_nms


def test_soft_nms_decays_overlapping_boxes_of_the_same_class_only():
    boxes = torch.tensor(
        [[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.0], [0.0, 0.0, 10.0, 9.5], [50.0, 50.0, 60.0, 60.0]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 1, 0])
    keep, new = soft_nms(boxes, scores, labels, iou_threshold=0.8, min_score=1e-3)
    # box 1 overlaps box 0 with IoU 0.9 > 0.8 -> 0.8 * 0.1; box 2 has another label -> untouched
    assert keep.tolist() == [0, 2, 3, 1]
    torch.testing.assert_close(new, torch.tensor([0.9, 0.7, 0.6, 0.08]))


def test_soft_nms_drops_scores_below_min_score():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 9.95]])
    keep, _ = soft_nms(boxes, torch.tensor([0.9, 0.5]), torch.tensor([0, 0]), 0.8, min_score=0.01)
    assert keep.tolist() == [0]


def test_postprocess_top_k_over_queries_and_classes_and_clamping():
    logits = torch.tensor([[[3.0, -9.0], [2.0, 1.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.95, 0.5, 0.2, 0.4]]])
    (det,) = postprocess(logits, boxes, torch.tensor([[100, 200]]), max_per_image=3, soft_nms_iou=None)
    assert det["labels"].tolist() == [0, 0, 1]
    torch.testing.assert_close(det["boxes"][0], torch.tensor([80.0, 40.0, 120.0, 60.0]))
    torch.testing.assert_close(det["boxes"][1], torch.tensor([170.0, 30.0, 200.0, 70.0]))  # clamped at w = 200


def test_more_candidates_can_enter_soft_nms_than_are_returned():
    torch.manual_seed(0)
    logits, boxes = torch.randn(1, 10, 3), torch.rand(1, 10, 4) * 0.5 + 0.25
    sizes = torch.tensor([[50, 50]])
    (few,) = postprocess(logits, boxes, sizes, max_per_image=5, soft_nms_iou=0.5)
    (many,) = postprocess(logits, boxes, sizes, max_per_image=5, soft_nms_iou=0.5, candidates_before_nms=30)
    assert len(few["scores"]) <= 5 and len(many["scores"]) == 5
    assert (many["scores"][:-1] >= many["scores"][1:]).all()
