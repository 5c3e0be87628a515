"""Loss functions of the DETR side: Quality Focal Loss (written here: torchvision has only the focal loss), the
sigmoid focal loss (torchvision.ops), weighted L1 and GIoU (torchvision.ops) with an explicit normaliser.

:class:`QualityFocalLoss` (Co-DINO) and :class:`SigmoidFocalLoss` (Co-Deformable-DETR) are the interchangeable
classification losses of :class:`~codetr.models.losses.set_criterion.SetCriterion`: ``(logits (N, K), labels (N,)
with K = background, quality (N,) IoU of each positive) -> (N,)`` per-sample losses summed over classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """QFL (Generalized Focal Loss) per sample, summed over classes.

    Args:
        logits: ``(N, K)``; labels: ``(N,)`` in ``[0, K]`` (K = background); quality: ``(N,)`` IoU targets of the
            positives (ignored for background).

    Returns:
        ``(N,)``. Every class is pushed to 0 with weight ``sigmoid^beta``; a positive's own class is pushed to
        its quality with weight ``|quality - sigmoid|^beta``.
    """
    # One dense pass over (N, K): the target is the quality at a positive's own class and 0 elsewhere, so
    # ``|target - sigmoid|^beta`` is ``sigmoid^beta`` for every background entry. No gather of the positives, hence
    # no data-dependent shape and no device -> host sync (this runs for every decoder layer and query group).
    num_classes = logits.shape[1]
    positive = (labels >= 0) & (labels < num_classes)
    own_class = F.one_hot(labels.clamp(0, num_classes - 1), num_classes).bool() & positive[:, None]
    target = torch.where(own_class, quality.to(logits.dtype)[:, None], torch.zeros_like(logits))
    weight = (target - logits.sigmoid()).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight).sum(dim=1)


class QualityFocalLoss:
    """:func:`quality_focal_loss` with its ``beta``: targets are the positives' IoU."""

    def __init__(self, beta: float = 2.0):
        self.beta = beta

    def __call__(self, logits: Tensor, labels: Tensor, quality: Tensor) -> Tensor:
        return quality_focal_loss(logits, labels, quality, self.beta)


class SigmoidFocalLoss:
    """Focal loss (RetinaNet) on one-hot targets (background = all zeros), summed over classes; ``quality`` unused."""

    def __init__(self, alpha: float = 0.25, gamma: float = 2.0):
        self.alpha, self.gamma = alpha, gamma

    def __call__(self, logits: Tensor, labels: Tensor, quality: Tensor) -> Tensor:
        num_classes = logits.shape[1]
        target = F.one_hot(labels, num_classes + 1)[:, :num_classes].to(logits.dtype)
        return sigmoid_focal_loss(logits, target, self.alpha, self.gamma, reduction="none").sum(dim=1)


def weighted_l1(pred: Tensor, target: Tensor, weight: Tensor, normalizer: Tensor) -> Tensor:
    """``sum(|pred - target| * weight) / normalizer`` over ``(N, 4)`` boxes."""
    return ((pred - target).abs() * weight).sum() / normalizer


def weighted_giou(pred_xyxy: Tensor, target_xyxy: Tensor, weight: Tensor, normalizer: Tensor) -> Tensor:
    """``sum((1 - GIoU) * weight) / normalizer`` over rows with ``weight > 0``. ``weight``: ``(N,)``.

    Rows with zero weight may hold degenerate or non-finite boxes: they are replaced by a unit box on both sides
    (loss 0, gradient exactly 0) instead of being dropped, so no data-dependent shape and no host sync arise.
    """
    keep = (weight > 0)[:, None]
    unit = pred_xyxy.new_tensor([0.0, 0.0, 1.0, 1.0])
    loss = generalized_box_iou_loss(
        torch.where(keep, pred_xyxy, unit), torch.where(keep, target_xyxy, unit), reduction="none"
    )
    return (loss * weight).sum() / normalizer
