"""Quality focal loss and the weighted box losses, against hand computations."""

import torch
import torch.nn.functional as F

from codetr.models.losses.losses import quality_focal_loss, weighted_giou, weighted_l1


def test_qfl_background_and_positive_terms():
    logits = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    labels = torch.tensor([2, 1])  # first background, second positive for class 1 with quality 0.7
    quality = torch.tensor([0.0, 0.7])
    loss = quality_focal_loss(logits, labels, quality, beta=2.0)
    p = logits.sigmoid()
    bg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * p**2
    pos = F.binary_cross_entropy_with_logits(torch.tensor(0.0), torch.tensor(0.7)) * (0.7 - p[1, 1]).abs() ** 2
    torch.testing.assert_close(loss, torch.stack([bg[0].sum(), bg[1, 0] + pos]))


def test_qfl_is_zero_at_perfect_prediction_of_background():
    assert quality_focal_loss(torch.full((1, 3), -30.0), torch.tensor([3]), torch.zeros(1)).item() < 1e-20


def test_weighted_l1_and_giou():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [5.0, 5.0, 5.0, 5.0]])  # second row degenerate, weight 0
    weight = torch.tensor([1.0, 0.0])
    l1 = weighted_l1(pred, target, weight[:, None].expand(2, 4), torch.tensor(2.0))
    torch.testing.assert_close(l1, torch.tensor(2.0))
    # IoU = 1/7, enclosing area 9, union 7 -> GIoU = 1/7 - 2/9
    giou = weighted_giou(pred, target, weight, torch.tensor(1.0))
    torch.testing.assert_close(giou, torch.tensor(1 - (1 / 7 - 2 / 9)), atol=1e-6, rtol=1e-6)
    zero = weighted_giou(pred, target, torch.zeros(2), torch.tensor(1.0))
    assert zero.item() == 0.0
