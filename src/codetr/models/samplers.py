"""Random positive / negative sampler of the RPN and RoI head (docs/architecture.md#faster-rcnn), written by hand.

Randomness is pinned to the reference: a subset is drawn with ``torch.randperm(n)`` on the CPU default
generator, only when there are more candidates than wanted (positives first, then negatives), and each
selection is returned sorted ascending (like ``Tensor.unique``). The caller runs images in order (RPN for every
image, then the RoI head for every image), which reproduces the reference's random stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from codetr.models.assigners import AssignResult


@dataclass
class SamplingResult:
    """Sampled priors of one image.

    priors ``(P, 4)`` xyxy: all candidates (GT boxes first when they were added); pos_inds / neg_inds: indices into
    ``priors``; pos_assigned_gt_inds ``(n_pos,)``; pos_gt_labels ``(n_pos,)``; pos_gt_boxes ``(n_pos, 4)`` xyxy;
    pos_is_gt ``(n_pos,)`` bool (the positive is a GT box added as a candidate).
    """

    priors: Tensor
    pos_inds: Tensor
    neg_inds: Tensor
    pos_assigned_gt_inds: Tensor
    pos_gt_labels: Tensor
    pos_gt_boxes: Tensor
    pos_is_gt: Tensor

    @property
    def pos_priors(self) -> Tensor:
        return self.priors[self.pos_inds]

    @property
    def neg_priors(self) -> Tensor:
        return self.priors[self.neg_inds]

    @property
    def sampled_priors(self) -> Tensor:
        """``(n_pos + n_neg, 4)``: positives then negatives."""
        return torch.cat([self.pos_priors, self.neg_priors])

    @property
    def num_sampled(self) -> int:
        return len(self.pos_inds) + len(self.neg_inds)


def _choose(candidates: Tensor, num: int) -> Tensor:
    """At most ``num`` of ``candidates``: all of them if few enough, else a ``randperm`` subset."""
    if len(candidates) <= num:
        return candidates
    return candidates[torch.randperm(len(candidates))[:num].to(candidates.device)]


class RandomSampler:
    """Draw ``num * pos_fraction`` positives at most and fill up to ``num`` with negatives.

    Args:
        num: samples per image (RPN 256, RoI head 512).
        pos_fraction: largest positive share (RPN 0.5, RoI head 0.25).
        neg_pos_ub: if >= 0, at most ``neg_pos_ub * max(1, n_pos)`` negatives (reference: -1 = off).
        add_gt_as_proposals: prepend the GT boxes to the candidates (RoI head: True, RPN: False).
    """

    def __init__(
        self,
        num: int = 256,
        pos_fraction: float = 0.5,
        neg_pos_ub: float = -1,
        add_gt_as_proposals: bool = False,
    ):
        self.num, self.pos_fraction = num, pos_fraction
        self.neg_pos_ub, self.add_gt_as_proposals = neg_pos_ub, add_gt_as_proposals

    def __call__(
        self, assign: AssignResult, priors: Tensor, gt_boxes: Tensor, gt_labels: Tensor
    ) -> SamplingResult:
        """assign: result over ``priors`` ``(N, 4)``; gt ``(G, 4)`` / ``(G,)``.
        Mutates ``assign`` when GTs are added."""
        is_gt = torch.zeros(len(priors), dtype=torch.bool, device=priors.device)
        if self.add_gt_as_proposals and len(gt_boxes) > 0:
            priors = torch.cat([gt_boxes.to(priors.dtype), priors])
            assign.prepend_gts(gt_labels)
            is_gt = torch.cat([torch.ones(len(gt_boxes), dtype=torch.bool, device=priors.device), is_gt])
        expected_pos = int(self.num * self.pos_fraction)
        pos = _choose(torch.nonzero(assign.gt_inds > 0).view(-1), expected_pos).unique()
        expected_neg = self.num - len(pos)
        if self.neg_pos_ub >= 0:
            expected_neg = min(expected_neg, int(self.neg_pos_ub * max(1, len(pos))))
        neg = _choose(torch.nonzero(assign.gt_inds == 0).view(-1), expected_neg).unique()
        assigned = assign.gt_inds[pos] - 1
        gt_sel = gt_boxes[assigned] if len(gt_boxes) else gt_boxes.new_zeros(0, 4)
        return SamplingResult(priors, pos, neg, assigned, assign.labels[pos], gt_sel, is_gt[pos])
