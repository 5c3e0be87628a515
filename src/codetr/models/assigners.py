"""Box assigners of the auxiliary heads: max-IoU (RPN, RoI head) and ATSS (docs/architecture.md#atss, #faster-rcnn).

Written by hand (no library has them); IoUs come from ``torchvision.ops.box_iou``. The operation order follows
the reference so that float ties (``==`` on IoUs in low-quality matching, ``topk`` on centre distances) resolve
the same way. All boxes are ``xyxy`` absolute pixels.

Result convention (``AssignResult``): ``gt_inds`` ``(N,)`` int64 with ``0`` = negative, ``k > 0`` = assigned to
GT ``k - 1``, ``-1`` = ignored (neither); ``labels`` ``(N,)`` the assigned GT's class, ``-1`` elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou


@dataclass
class AssignResult:
    """Per-prior assignment: ``gt_inds`` (N,) (0 neg, k+1 = GT k, -1 ignore), ``max_overlaps`` (N,),
    ``labels`` (N,) (-1 where not positive), ``num_gts``."""

    num_gts: int
    gt_inds: Tensor
    max_overlaps: Tensor
    labels: Tensor

    def prepend_gts(self, gt_labels: Tensor) -> None:
        """Account for the GT boxes being added in front of the priors: each is positive for itself."""
        own = torch.arange(1, len(gt_labels) + 1, dtype=torch.long, device=gt_labels.device)
        self.gt_inds = torch.cat([own, self.gt_inds])
        self.max_overlaps = torch.cat([self.max_overlaps.new_ones(len(gt_labels)), self.max_overlaps])
        self.labels = torch.cat([gt_labels, self.labels])


class MaxIoUAssigner:
    """Max-IoU assignment with optional low-quality matching.

    A prior whose best IoU is in ``[0, neg_iou_thr)`` is negative, ``>= pos_iou_thr`` positive (best GT);
    others stay ignored (-1). With ``match_low_quality``, for every GT whose best IoU is ``>= min_pos_iou`` all
    priors reaching exactly that best IoU become positive for it (later GTs overwrite earlier ones).

    Reference values: RPN 0.7 / 0.3 / 0.3 / True; RoI head 0.5 / 0.5 / 0.5 / False.
    """

    def __init__(
        self,
        pos_iou_thr: float = 0.7,
        neg_iou_thr: float = 0.3,
        min_pos_iou: float = 0.3,
        match_low_quality: bool = True,
    ):
        self.pos_iou_thr, self.neg_iou_thr = pos_iou_thr, neg_iou_thr
        self.min_pos_iou, self.match_low_quality = min_pos_iou, match_low_quality

    def __call__(self, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> AssignResult:
        """priors ``(N, 4)``, gt_boxes ``(G, 4)`` xyxy, gt_labels ``(G,)`` -> ``AssignResult``."""
        num_gts, num_priors = len(gt_boxes), len(priors)
        gt_inds = torch.full((num_priors,), -1, dtype=torch.long, device=priors.device)
        labels = torch.full((num_priors,), -1, dtype=torch.long, device=priors.device)
        if num_gts == 0 or num_priors == 0:
            if num_gts == 0:
                gt_inds.zero_()
            return AssignResult(num_gts, gt_inds, priors.new_zeros(num_priors), labels)
        overlaps = box_iou(gt_boxes, priors)  # (G, N)
        max_overlaps, argmax = overlaps.max(dim=0)
        gt_max, _ = overlaps.max(dim=1)
        gt_inds[(max_overlaps >= 0) & (max_overlaps < self.neg_iou_thr)] = 0
        positive = max_overlaps >= self.pos_iou_thr
        gt_inds[positive] = argmax[positive] + 1
        if self.match_low_quality:
            for g in range(num_gts):
                if gt_max[g] >= self.min_pos_iou:
                    gt_inds[overlaps[g] == gt_max[g]] = g + 1
        pos = gt_inds > 0
        labels[pos] = gt_labels[gt_inds[pos] - 1]
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)


class ATSSAssigner:
    """Adaptive Training Sample Selection (Zhang et al. 2020), docs/architecture.md#atss.

    Per GT: on every level take the ``topk`` priors whose centres are closest to the GT centre; the IoU
    threshold is mean + unbiased std of these candidates' IoUs; a candidate is positive if its IoU reaches the
    threshold and its centre lies inside the GT by more than ``min_inside`` px on all sides. A prior positive for
    several GTs takes the one with the highest IoU; all other priors are negative (no ignored ones).
    """

    def __init__(self, topk: int = 9, min_inside: float = 0.01):
        self.topk, self.min_inside = topk, min_inside

    def __call__(
        self, priors: Tensor, num_level_priors: Sequence[int], gt_boxes: Tensor, gt_labels: Tensor
    ) -> AssignResult:
        """priors ``(N, 4)`` xyxy (levels concatenated, ``num_level_priors`` per level), gt ``(G, 4)`` / ``(G,)``."""
        num_gts, num_priors = len(gt_boxes), len(priors)
        gt_inds = torch.zeros(num_priors, dtype=torch.long, device=priors.device)
        labels = torch.full((num_priors,), -1, dtype=torch.long, device=priors.device)
        if num_gts == 0 or num_priors == 0:
            return AssignResult(num_gts, gt_inds, priors.new_zeros(num_priors), labels)
        overlaps = box_iou(priors, gt_boxes)  # (N, G)
        gt_centres = torch.stack(
            [(gt_boxes[:, 0] + gt_boxes[:, 2]) / 2.0, (gt_boxes[:, 1] + gt_boxes[:, 3]) / 2.0], 1
        )
        prior_cx = (priors[:, 0] + priors[:, 2]) / 2.0
        prior_cy = (priors[:, 1] + priors[:, 3]) / 2.0
        prior_centres = torch.stack([prior_cx, prior_cy], dim=1)
        distances = (prior_centres[:, None, :] - gt_centres[None, :, :]).pow(2).sum(-1).sqrt()  # (N, G)

        candidates, start = [], 0
        for count in num_level_priors:
            if count > 0:
                k = min(self.topk, count)
                _, idx = distances[start : start + count].topk(k, dim=0, largest=False)
                candidates.append(idx + start)
            start += count
        candidates = torch.cat(candidates, dim=0)  # (C, G)
        gt_range = torch.arange(num_gts, device=priors.device)
        cand_overlaps = overlaps[candidates, gt_range]
        threshold = cand_overlaps.mean(0) + cand_overlaps.std(0)
        is_pos = cand_overlaps >= threshold[None, :]

        cx, cy = prior_cx[candidates], prior_cy[candidates]  # (C, G)
        inside = (
            torch.stack(
                [cx - gt_boxes[:, 0], cy - gt_boxes[:, 1], gt_boxes[:, 2] - cx, gt_boxes[:, 3] - cy], dim=1
            ).min(dim=1)[0]
            > self.min_inside
        )
        is_pos = is_pos & inside

        # IoU of (prior, GT) where that pair is a selected positive, -inf elsewhere; best GT per prior.
        masked = torch.full_like(overlaps, float("-inf"))
        cand_flat = candidates + gt_range[None, :] * num_priors  # index into the (G, N) transposed layout
        chosen = cand_flat[is_pos]
        masked_t = masked.t().contiguous().view(-1)
        masked_t[chosen] = overlaps.t().contiguous().view(-1)[chosen]
        masked = masked_t.view(num_gts, num_priors).t()
        max_overlaps, argmax = masked.max(dim=1)
        pos = max_overlaps != float("-inf")
        gt_inds[pos] = argmax[pos] + 1
        labels[pos] = gt_labels[argmax[pos]]
        return AssignResult(num_gts, gt_inds, max_overlaps, labels)
