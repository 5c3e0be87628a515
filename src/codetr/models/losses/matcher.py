"""One-to-one Hungarian matching of predictions to ground truth (scipy's ``linear_sum_assignment``).

Cost = ``w_cls * focal-style class cost + w_l1 * L1(normalised cxcywh) - w_giou * GIoU(absolute xyxy)``.
All cost matrices of a step (every image, every decoder layer, the encoder proposals) go to the CPU in a single
transfer, and all indices come back in one.

Non-finite costs (NaN / inf predictions) raise :class:`NonFiniteCostError` naming the image, except inside
:func:`tolerate_nonfinite_costs`, where they are replaced by a large finite cost so that matching (and so the whole
forward and backward, with their collectives on every rank) completes: the loss terms are then NaN and the
training loop skips the step on every rank (:mod:`codetr.lightning.nonfinite`). Raising in the middle of a sharded
(FSDP) forward would leave the other ranks waiting in their collectives.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import generalized_box_iou

from codetr.models.box_ops import cxcywh_to_xyxy

log = logging.getLogger(__name__)
_TOLERATE_NONFINITE = contextvars.ContextVar("codetr_tolerate_nonfinite_costs", default=False)
NONFINITE_COST = 1e8  # far above any finite cost (class + L1 + GIoU costs are O(10)); such pairs are never preferred


class NonFiniteCostError(ValueError):
    """A matching cost is NaN / inf: the predictions (or ground truth) of one image are not finite. Training
    turns it into a skipped step (:mod:`codetr.lightning.nonfinite`); elsewhere it is an error naming the image."""


@contextlib.contextmanager
def tolerate_nonfinite_costs() -> Iterator[None]:
    """Within this context, non-finite costs are matched as :data:`NONFINITE_COST` (with a warning) instead of
    raising :class:`NonFiniteCostError`."""
    token = _TOLERATE_NONFINITE.set(True)
    try:
        yield
    finally:
        _TOLERATE_NONFINITE.reset(token)


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
            per image ``(query_index, gt_index)`` int64 tensors (on the predictions' device) of equal length
            ``min(Q, G_i)``.
        """
        return self.match_many([(logits, boxes)], gt_boxes, gt_labels, factors)[0]

    @torch.no_grad()
    def match_many(
        self, predictions: Sequence[tuple[Tensor, Tensor]], gt_boxes: list[Tensor], gt_labels: list[Tensor],
        factors: Tensor,
    ) -> list[list[tuple[Tensor, Tensor]]]:
        """Match several prediction sets against the same ground truth (every decoder layer and the encoder
        proposals of one step) with ONE device->host transfer of all cost matrices and ONE host->device transfer
        of all indices, instead of one of each per set.

        Args:
            predictions: ``[(logits (B, Q, K), boxes (B, Q, 4) normalised cxcywh), ...]``; other args as ``__call__``.

        Returns:
            per prediction set, per image ``(query_index, gt_index)`` int64 tensors on the predictions' device.
        """
        costs = [
            [self.cost(logits[i], boxes[i], gt_boxes[i], gt_labels[i], factors[i]) if len(gt_labels[i]) else None
             for i in range(logits.shape[0])]
            for logits, boxes in predictions
        ]
        present = [c for per_set in costs for c in per_set if c is not None]
        cpu = torch.cat([c.flatten() for c in present]).float().cpu() if present else None
        # one finiteness check of all costs; only a failed one looks for the image to name
        finite = cpu is None or bool(torch.isfinite(cpu).all())
        if not finite and _TOLERATE_NONFINITE.get():
            log.warning("Hungarian matching: %d non-finite costs (NaN/inf predictions) matched as cost %g",
                        int((~torch.isfinite(cpu)).sum()), NONFINITE_COST)
            cpu = torch.nan_to_num(cpu, nan=NONFINITE_COST, posinf=NONFINITE_COST, neginf=-NONFINITE_COST)
            finite = True
        indices, offset = [], 0
        for per_set in costs:
            for image, c in enumerate(per_set):
                if c is None:
                    indices.append((np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)))
                    continue
                matrix = cpu[offset : offset + c.numel()].view(c.shape)
                offset += c.numel()
                if not finite and not torch.isfinite(matrix).all():
                    bad = (~torch.isfinite(matrix)).sum().item()
                    raise NonFiniteCostError(
                        f"Hungarian matching: image {image} of the batch has {bad} non-finite costs "
                        "(NaN/inf predictions or degenerate ground-truth boxes); check the loss inputs"
                    )
                indices.append(linear_sum_assignment(matrix.numpy()))
        device = predictions[0][0].device if predictions else torch.device("cpu")
        lengths = [len(rows) for rows, _ in indices]
        packed = torch.as_tensor(np.concatenate([np.concatenate([rows, cols]) for rows, cols in indices]
                                                if indices else [np.empty(0)]), dtype=torch.long).to(device)
        results, flat, start = [], [], 0
        for length in lengths:
            rows_and_cols = packed[start : start + 2 * length]
            flat.append((rows_and_cols[:length], rows_and_cols[length:]))
            start += 2 * length
        for set_index in range(len(predictions)):
            width = len(costs[set_index])
            results.append(flat[set_index * width : (set_index + 1) * width])
        return results
