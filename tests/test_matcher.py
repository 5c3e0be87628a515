"""Hungarian matching on toy costs."""

import pytest
import torch

from codetr.models.losses.matcher import HungarianMatcher


def test_matches_each_gt_to_its_obvious_query():
    matcher = HungarianMatcher(class_weight=0.0, l1_weight=1.0, giou_weight=0.0)
    boxes = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.5, 0.5]]])
    gt = [torch.tensor([[0.69, 0.71, 0.2, 0.2], [0.21, 0.2, 0.1, 0.1]])]
    (queries, gts), = matcher(torch.zeros(1, 3, 4), boxes, gt, [torch.tensor([0, 1])], torch.ones(1, 4))
    assert dict(zip(gts.tolist(), queries.tolist())) == {0: 1, 1: 0}


def test_class_cost_prefers_the_confident_query():
    matcher = HungarianMatcher(class_weight=1.0, l1_weight=0.0, giou_weight=0.0)
    logits = torch.tensor([[[5.0, -5.0], [-5.0, 5.0]]])
    boxes = torch.full((1, 2, 4), 0.5)
    (queries, gts), = matcher(
        logits, boxes, [torch.tensor([[0.5, 0.5, 0.5, 0.5]])], [torch.tensor([1])], torch.ones(1, 4)
    )
    assert queries.tolist() == [1] and gts.tolist() == [0]


def test_focal_cost_value():
    matcher = HungarianMatcher(class_weight=1.0, l1_weight=0.0, giou_weight=0.0)
    p = torch.sigmoid(torch.tensor(0.3))
    expected = 0.25 * (1 - p) ** 2 * -torch.log(p + 1e-12) - 0.75 * p**2 * -torch.log(1 - p + 1e-12)
    box = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = matcher.cost(torch.tensor([[0.3]]), box, box, torch.tensor([0]), torch.ones(4))
    torch.testing.assert_close(cost[0, 0], expected, atol=1e-6, rtol=1e-6)


def test_images_without_ground_truth_get_no_match():
    matcher = HungarianMatcher()
    result = matcher(torch.zeros(2, 3, 5), torch.rand(2, 3, 4), [torch.zeros(0, 4), torch.rand(1, 4) * 0.5 + 0.2],
                     [torch.zeros(0, dtype=torch.long), torch.tensor([2])], torch.full((2, 4), 10.0))
    assert len(result[0][0]) == 0 and len(result[1][0]) == 1


def test_non_finite_costs_raise_a_clear_error():
    matcher = HungarianMatcher()
    boxes = torch.rand(1, 3, 4)
    boxes[0, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        matcher(torch.zeros(1, 3, 2), boxes, [torch.rand(1, 4)], [torch.tensor([0])], torch.ones(1, 4))


def test_one_host_round_trip_per_training_step_gives_the_per_layer_matches(monkeypatch):
    from test_co_detr import batch, detector

    model = detector().train()
    images, sizes, targets = batch()
    matcher = model.query_head.criterion.matcher
    calls, original = [], matcher.match_many

    def counting(predictions, *args):
        calls.append(len(predictions))
        results = original(predictions, *args)
        for (logits, boxes), per_image in zip(predictions, results):  # equal to one call per prediction set
            for got, expected in zip(per_image, original([(logits, boxes)], *args)[0]):
                assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        return results

    monkeypatch.setattr(matcher, "match_many", counting)
    model(images, sizes, targets)
    assert calls == [model.query_head.num_layers + 1]  # every decoder layer + the encoder proposals, one call
