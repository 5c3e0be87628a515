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


def test_zero_weight_rows_with_nan_boxes_give_no_loss_and_no_nan_gradient():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [float("nan")] * 4], requires_grad=True)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    loss = weighted_giou(pred, target, torch.tensor([1.0, 0.0]), torch.tensor(1.0))
    loss.backward()
    torch.testing.assert_close(loss.detach(), torch.tensor(1 - (1 / 7 - 2 / 9)), atol=1e-6, rtol=1e-6)
    assert torch.isfinite(pred.grad).all() and (pred.grad[1] == 0).all() and (pred.grad[0] != 0).any()


def _reference_qfl(logits, labels, quality, beta=2.0):
    """The gather form: background push on every entry, the positive's own class replaced."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    for row in range(len(labels)):
        label = int(labels[row])
        if label < logits.shape[1]:
            own = F.binary_cross_entropy_with_logits(logits[row, label], quality[row])
            loss[row, label] = own * (quality[row] - prob[row, label]).abs().pow(beta)
    return loss.sum(1)


def test_qfl_equals_the_gather_form_on_random_input():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g) * 3
    labels = torch.randint(0, 8, (50,), generator=g)  # 7 = background
    quality = torch.rand(50, generator=g)
    torch.testing.assert_close(quality_focal_loss(logits, labels, quality), _reference_qfl(logits, labels, quality),
                               rtol=1e-6, atol=1e-7)


def test_main_head_loss_has_no_data_dependent_host_sync():
    """Dynamo refuses (fullgraph) any ``nonzero`` / boolean-mask gather / ``bool(tensor)`` / ``.item()``: each of
    them is a device -> host synchronisation on a GPU. The loss runs once per decoder layer and query group."""
    from codetr.models.losses.set_criterion import SetCriterion

    criterion = SetCriterion(num_classes=5)
    g = torch.Generator().manual_seed(0)
    b, q = 2, 30
    labels = torch.randint(0, 6, (b, q), generator=g)
    box_targets = torch.cat(
        [torch.rand(b, q, 2, generator=g) * 0.5 + 0.25, torch.rand(b, q, 2, generator=g) * 0.3 + 0.05], -1
    )
    box_weights = (labels < 5).float()[..., None].expand(b, q, 4)
    box_targets = box_targets * box_weights
    args = (torch.randn(b, q, 5, generator=g), torch.rand(b, q, 4, generator=g) * 0.5 + 0.2, labels,
            torch.ones(b, q), box_targets, box_weights, torch.tensor([[100.0, 80.0, 100.0, 80.0]] * b))
    eager = criterion.loss_from_targets(*args)
    compiled = torch.compile(criterion.loss_from_targets, fullgraph=True, backend="eager")(*args)
    for a, c in zip(eager, compiled):
        torch.testing.assert_close(a, c)
