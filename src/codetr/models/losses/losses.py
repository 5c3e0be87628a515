"""Loss functions of the DETR side: Quality Focal Loss (written here: torchvision has only the focal loss),
weighted L1 and GIoU (torchvision.ops) with an explicit normaliser."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import generalized_box_iou_loss


def quality_focal_loss(logits: Tensor, labels: Tensor, quality: Tensor, beta: float = 2.0) -> Tensor:
    """QFL (Generalized Focal Loss) per sample, summed over classes.

    Args:
        logits: ``(N, K)``; labels: ``(N,)`` in ``[0, K]`` (K = background); quality: ``(N,)`` IoU targets of the
            positives (ignored for background).

    Returns:
        ``(N,)``. Every class is pushed to 0 with weight ``sigmoid^beta``; a positive's own class is pushed to
        its quality with weight ``|quality - sigmoid|^beta``.
    """
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * prob.pow(beta)
    positive = torch.nonzero((labels >= 0) & (labels < logits.shape[1])).squeeze(1)
    if positive.numel():
        pos_label = labels[positive]
        pos_logits = logits[positive, pos_label]
        target = quality[positive].to(logits.dtype)
        pos_loss = F.binary_cross_entropy_with_logits(pos_logits, target, reduction="none")
        loss = loss.index_put((positive, pos_label), pos_loss * (target - prob[positive, pos_label]).abs().pow(beta))
    return loss.sum(dim=1)


def weighted_l1(pred: Tensor, target: Tensor, weight: Tensor, normalizer: Tensor) -> Tensor:
    """``sum(|pred - target| * weight) / normalizer`` over ``(N, 4)`` boxes."""
    return ((pred - target).abs() * weight).sum() / normalizer


def weighted_giou(pred_xyxy: Tensor, target_xyxy: Tensor, weight: Tensor, normalizer: Tensor) -> Tensor:
    """``sum((1 - GIoU) * weight) / normalizer`` evaluated on rows with ``weight > 0`` only (other rows may hold
    degenerate boxes). ``weight``: ``(N,)``."""
    keep = weight > 0
    if not bool(keep.any()):
        return pred_xyxy.sum() * 0.0
    loss = generalized_box_iou_loss(pred_xyxy[keep], target_xyxy[keep], reduction="none")
    return (loss * weight[keep]).sum() / normalizer
