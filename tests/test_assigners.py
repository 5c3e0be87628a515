"""Max-IoU and ATSS assigners and the random sampler on hand-checked toy layouts."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from codetr.models.anchors import AnchorGenerator
from codetr.models.assigners import ATSSAssigner, MaxIoUAssigner
from codetr.models.samplers import RandomSampler


def _boxes(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- max IoU ------------------------------------------------------------------------------------------------
GT = _boxes([0, 0, 10, 10], [100, 100, 110, 110], [200, 200, 210, 210])
LABELS = torch.tensor([3, 5, 7])
PRIORS = _boxes(
    [0, 0, 10, 10],  # IoU 1.0 with GT0 -> positive
    [0, 0, 10, 5],  # 0.5 with GT0 -> ignored (between 0.3 and 0.7)
    [20, 20, 30, 30],  # 0 -> negative
    [0, 0, 10, 8],  # 0.8 -> positive
    [100, 100, 110, 104],  # 0.4 with GT1 -> ignored
    [104, 100, 110, 110],  # 0.6 with GT1 = GT1's best -> low-quality positive
    [100, 104, 110, 110],  # 0.6 too (tie) -> low-quality positive as well
    [200, 200, 202, 210],  # 0.2 with GT2 = GT2's best, below min_pos_iou -> negative
)


def test_max_iou_thresholds_and_low_quality_matching():
    result = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=True)(PRIORS, GT, LABELS)
    assert result.gt_inds.tolist() == [1, -1, 0, 1, -1, 2, 2, 0]
    assert result.labels.tolist() == [3, -1, -1, 3, -1, 5, 5, -1]
    torch.testing.assert_close(result.max_overlaps[:4], torch.tensor([1.0, 0.5, 0.0, 0.8]))


def test_max_iou_without_low_quality_matching():
    result = MaxIoUAssigner(0.7, 0.3, 0.3, match_low_quality=False)(PRIORS, GT, LABELS)
    assert result.gt_inds.tolist() == [1, -1, 0, 1, -1, -1, -1, 0]


def test_max_iou_low_quality_overrides_a_better_other_gt():
    """A prior that is GT1's best match goes to GT1 even if its IoU with GT0 passes pos_iou_thr."""
    gts = _boxes([0, 0, 10, 10], [0, 0, 10, 9])
    priors = _boxes([0, 0, 10, 9.5])  # IoU 0.95 with both (GT1: 90 / 95)
    result = MaxIoUAssigner(0.7, 0.3, 0.3, True)(priors, gts, torch.tensor([0, 1]))
    assert result.gt_inds.tolist() == [2]


def test_max_iou_roi_thresholds():
    result = MaxIoUAssigner(0.5, 0.5, 0.5, match_low_quality=False)(PRIORS, GT, LABELS)
    assert result.gt_inds.tolist() == [1, 1, 0, 1, 0, 2, 2, 0]


def test_max_iou_without_gt():
    result = MaxIoUAssigner()(PRIORS, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert result.gt_inds.tolist() == [0] * len(PRIORS)
    assert (result.labels == -1).all()


# --- ATSS ---------------------------------------------------------------------------------------------------
def _grid(size=8):
    """64 anchors of side 32 centred at (8x, 8y) (stride 8, octave scale 4)."""
    gen = AnchorGenerator((8,), ratios=(1.0,), octave_base_scale=4, scales_per_octave=1)
    return gen.level_anchors(0, (size, size))


def test_atss_single_gt_hand_computed_threshold():
    """GT [8,8,40,40] (centre (24,24)): candidates = the 3x3 anchors around (3,3) with IoU 1, 4 x 0.6 and
    4 x 576/1472. Threshold = mean + std = 0.7496 -> only the centre anchor (index 27) is positive."""
    anchors = _grid()
    result = ATSSAssigner(topk=9)(anchors, [64], _boxes([8, 8, 40, 40]), torch.tensor([4]))
    ious = torch.tensor([1.0] + [0.6] * 4 + [576 / 1472] * 4)
    assert float(ious.mean() + ious.std()) == pytest.approx(0.74956, abs=1e-4)
    assert torch.nonzero(result.gt_inds).view(-1).tolist() == [27]
    assert result.labels[27] == 4 and (result.labels[result.gt_inds == 0] == -1).all()


def test_atss_low_threshold_admits_neighbours_only_with_centre_inside():
    """A wide flat GT: its candidates' IoUs are similar, so several pass the threshold, but only anchors whose
    centre is strictly inside the GT can be positive."""
    anchors = _grid()
    gt = _boxes(
        [4, 20, 44, 28]
    )  # centre (24, 24): rows y=3 (centre 24) inside; rows 2 and 4 (16, 32) outside
    result = ATSSAssigner(topk=9)(anchors, [64], gt, torch.tensor([0]))
    assert torch.nonzero(result.gt_inds).view(-1).tolist() == [27]
    # the IoU threshold alone admits the anchors above and below (centres (24, 16) / (24, 32), on no GT side)
    loose = ATSSAssigner(topk=9, min_inside=-1e9)(anchors, [64], gt, torch.tensor([0]))
    assert torch.nonzero(loose.gt_inds).view(-1).tolist() == [19, 27, 35]


def test_atss_topk_per_level_and_best_iou_wins():
    anchors = torch.cat([_grid(8), _grid(4) * 2])  # level 2: stride 16, side 64
    gts = _boxes([8, 8, 40, 40], [10, 8, 42, 40])
    alone = ATSSAssigner(topk=9)(anchors, [64, 16], gts[1:], torch.tensor([1]))
    both = ATSSAssigner(topk=9)(anchors, [64, 16], gts, torch.tensor([0, 1]))
    assert alone.gt_inds[27] == 1  # anchor 27 is positive for GT1 alone (IoU 960/1088)
    assert both.gt_inds[27] == 1  # but GT0 has IoU 1 with it: the higher IoU wins -> 1-based index 1 = GT0
    assert both.labels[27] == 0


def test_atss_without_gt():
    result = ATSSAssigner()(_grid(), [64], torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    assert (result.gt_inds == 0).all()


# --- random sampler -------------------------------------------------------------------------------------------
def _assign(num_pos, num_neg, num_ignored=0):
    from codetr.models.assigners import AssignResult

    gt_inds = torch.cat(
        [
            torch.ones(num_pos, dtype=torch.long),
            torch.zeros(num_neg, dtype=torch.long),
            -torch.ones(num_ignored).long(),
        ]
    )
    perm = torch.randperm(len(gt_inds), generator=torch.Generator().manual_seed(0))
    gt_inds = gt_inds[perm]
    labels = torch.where(gt_inds > 0, torch.tensor(2), torch.tensor(-1))
    return AssignResult(1, gt_inds, torch.zeros(len(gt_inds)), labels), torch.rand(len(gt_inds), 4)


def test_sampler_counts_and_sorted_subsets():
    assign, priors = _assign(10, 100, 5)
    result = RandomSampler(num=16, pos_fraction=0.5)(assign, priors, _boxes([0, 0, 1, 1]), torch.tensor([2]))
    assert len(result.pos_inds) == 8 and len(result.neg_inds) == 8
    assert torch.equal(result.pos_inds, result.pos_inds.sort().values)
    assert (assign.gt_inds[result.pos_inds] > 0).all() and (assign.gt_inds[result.neg_inds] == 0).all()
    assert (result.pos_gt_labels == 2).all() and (result.pos_assigned_gt_inds == 0).all()


def test_sampler_fills_with_negatives_and_draws_only_when_needed():
    assign, priors = _assign(3, 100)
    calls = []
    real = torch.randperm

    def counting(n, *args, **kwargs):
        calls.append(n)
        return real(n, *args, **kwargs)

    with mock.patch("torch.randperm", counting):
        result = RandomSampler(num=16, pos_fraction=0.5)(
            assign, priors, _boxes([0, 0, 1, 1]), torch.tensor([2])
        )
    assert len(result.pos_inds) == 3 and len(result.neg_inds) == 13
    assert calls == [100]  # positives were few enough: only the negatives are drawn


def test_sampler_arange_permutation_takes_the_first_candidates():
    assign, priors = _assign(10, 100)
    with mock.patch("torch.randperm", lambda n, *a, **k: torch.arange(n)):
        result = RandomSampler(num=16, pos_fraction=0.25)(
            assign, priors, _boxes([0, 0, 1, 1]), torch.tensor([2])
        )
    assert torch.equal(result.pos_inds, torch.nonzero(assign.gt_inds > 0).view(-1)[:4])
    assert torch.equal(result.neg_inds, torch.nonzero(assign.gt_inds == 0).view(-1)[:12])


def test_sampler_prepends_gts_and_neg_pos_upper_bound():
    gts = _boxes([0, 0, 10, 10], [20, 20, 30, 30])
    priors = _boxes([0, 0, 10, 9], [50, 50, 60, 60], [70, 70, 80, 80], [90, 90, 95, 95])
    assign = MaxIoUAssigner(0.5, 0.5, 0.5, False)(priors, gts, torch.tensor([1, 6]))
    result = RandomSampler(num=8, pos_fraction=0.5, neg_pos_ub=0.5, add_gt_as_proposals=True)(
        assign, priors, gts, torch.tensor([1, 6])
    )
    assert result.priors.shape == (6, 4) and torch.equal(result.priors[:2], gts)
    assert result.pos_inds.tolist() == [0, 1, 2]
    assert result.pos_is_gt.tolist() == [True, True, False]
    assert result.pos_gt_labels.tolist() == [1, 6, 1]
    torch.testing.assert_close(result.pos_gt_boxes, gts[[0, 1, 0]])
    assert len(result.neg_inds) == 1  # 3 negatives exist, the bound int(0.5 * n_pos) = 1 cuts
    torch.testing.assert_close(result.sampled_priors[:3], torch.cat([gts, priors[:1]]))
    unbounded = MaxIoUAssigner(0.5, 0.5, 0.5, False)(priors, gts, torch.tensor([1, 6]))
    result = RandomSampler(num=8, pos_fraction=0.5, add_gt_as_proposals=True)(
        unbounded, priors, gts, torch.tensor([1, 6])
    )
    assert result.neg_inds.tolist() == [3, 4, 5]
