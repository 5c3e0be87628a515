"""One-to-one Hungarian matching of predictions to ground truth (scipy's ``linear_sum_assignment``).

Cost = ``w_cls * focal-style class cost + w_l1 * L1(normalised cxcywh) - w_giou * GIoU(absolute xyxy)``.
All images' cost matrices go to the CPU in a single transfer.
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou

from codetr.models.box_ops import cxcywh_to_xyxy


class NonFiniteCostError(ValueError):
    """A matching cost is NaN / inf: the predictions (or ground truth) of one image are not finite. Training
    turns it into a skipped step (:mod:`codetr.lightning.nonfinite`); elsewhere it is an error naming the image."""


class HungarianMatcher:
    def __init__(
        self,
        class_weight: float = 2.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        eps: float = 1e-12,
    ):
        self.class_weight, self.l1_weight, self.giou_weight = class_weight, l1_weight, giou_weight
        self.focal_alpha, self.focal_gamma, self.eps = focal_alpha, focal_gamma, eps

    @torch.no_grad()
    def cost(self, logits: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, factor: Tensor) -> Tensor:
        """Cost ``(Q, G)`` for one image: ``logits (Q, K)``, ``boxes (Q, 4)`` normalised cxcywh,
        ``gt_boxes (G, 4)`` normalised cxcywh, ``factor (4,)`` = (w, h, w, h) of the image."""
        prob = logits.sigmoid()[:, gt_labels]
        a, g = self.focal_alpha, self.focal_gamma
        pos = -(prob + self.eps).log() * a * (1 - prob).pow(g)
        neg = -(1 - prob + self.eps).log() * (1 - a) * prob.pow(g)
        cost_class = pos - neg
        cost_l1 = torch.cdist(boxes, gt_boxes, p=1)
        cost_giou = -generalized_box_iou(cxcywh_to_xyxy(boxes) * factor, cxcywh_to_xyxy(gt_boxes) * factor)
        return self.class_weight * cost_class + self.l1_weight * cost_l1 + self.giou_weight * cost_giou

    @torch.no_grad()
    def __call__(
        self, logits: Tensor, boxes: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor], factors: Tensor
    ) -> list[tuple[Tensor, Tensor]]:
        """Match a batch.

        Args:
            logits: ``(B, Q, K)``; boxes: ``(B, Q, 4)`` normalised cxcywh; gt_boxes: per image ``(G_i, 4)``
                normalised cxcywh; gt_labels: per image ``(G_i,)``; factors: ``(B, 4)``.

        Returns:
            per image ``(query_index, gt_index)`` int64 CPU tensors of equal length ``min(Q, G_i)``.
        """
        costs = [
            self.cost(logits[i], boxes[i], gt_boxes[i], gt_labels[i], factors[i]) if len(gt_labels[i]) else None
            for i in range(logits.shape[0])
        ]
        present = [c for c in costs if c is not None]
        cpu = torch.cat([c.flatten() for c in present]).float().cpu() if present else None
        results, offset = [], 0
        for image, c in enumerate(costs):
            if c is None:
                empty = torch.empty(0, dtype=torch.long)
                results.append((empty, empty))
                continue
            matrix = cpu[offset : offset + c.numel()].view(c.shape)
            offset += c.numel()
            if not torch.isfinite(matrix).all():
                bad = (~torch.isfinite(matrix)).sum().item()
                raise NonFiniteCostError(
                    f"Hungarian matching: image {image} of the batch has {bad} non-finite costs "
                    "(NaN/inf predictions or degenerate ground-truth boxes); check the loss inputs"
                )
            rows, cols = linear_sum_assignment(matrix.numpy())
            results.append((torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)))
        return results
