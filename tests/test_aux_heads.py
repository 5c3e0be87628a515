"""Auxiliary heads (RPN, RoI head, ATSS) on a small synthetic pyramid: interface, state-dict names, positive
sets, images without GT, gradients, autocast, and the reference-style grouped NMS."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import batched_nms

from codetr.models.heads.atss_head import ATSSHead
from codetr.models.heads.positives import PositiveSet
from codetr.models.heads.roi_head import RoIHead
from codetr.models.heads.rpn_head import RPNHead, grouped_nms

C, K = 32, 5
SIZES = torch.tensor([[96, 128], [64, 100]])
LEVELS = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2), (1, 1)]  # strides 4 .. 128 of a 96 x 128 batch


def _pyramid(seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, C, h, w, generator=gen) for h, w in LEVELS]
    for f in feats:
        f.requires_grad_(requires_grad)
    return feats


def _targets(empty_second=False):
    second = (
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
        if empty_second
        else {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2])}
    )
    return [
        {
            "boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]),
            "labels": torch.tensor([1, 3]),
        },
        second,
    ]


def _heads():
    torch.manual_seed(0)
    rpn = RPNHead(in_channels=C, feat_channels=C)
    roi = RoIHead(num_classes=K, in_channels=C, fc_channels=16, num_samples=64)
    atss = ATSSHead(num_classes=K, in_channels=C, feat_channels=C)
    return rpn, roi, atss


def _agnostic(targets):
    return [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])} for t in targets]


def test_state_dict_names_and_shapes_follow_the_reference():
    rpn, roi, atss = RPNHead(), RoIHead(), ATSSHead()
    assert {k: tuple(v.shape) for k, v in rpn.state_dict().items()} == {
        "rpn_conv.weight": (256, 256, 3, 3), "rpn_conv.bias": (256,), "rpn_cls.weight": (9, 256, 1, 1),
        "rpn_cls.bias": (9,), "rpn_reg.weight": (36, 256, 1, 1), "rpn_reg.bias": (36,),
    }  # fmt: skip
    assert {k: tuple(v.shape) for k, v in roi.state_dict().items()} == {
        "bbox_head.shared_fcs.0.weight": (1024, 12544), "bbox_head.shared_fcs.0.bias": (1024,),
        "bbox_head.shared_fcs.1.weight": (1024, 1024), "bbox_head.shared_fcs.1.bias": (1024,),
        "bbox_head.fc_cls.weight": (81, 1024), "bbox_head.fc_cls.bias": (81,),
        "bbox_head.fc_reg.weight": (320, 1024), "bbox_head.fc_reg.bias": (320,),
    }  # fmt: skip
    atss_keys = {k: tuple(v.shape) for k, v in atss.state_dict().items()}
    assert atss_keys["cls_convs.0.conv.weight"] == (256, 256, 3, 3)
    assert atss_keys["reg_convs.0.gn.bias"] == (256,)
    assert atss_keys["atss_cls.weight"] == (80, 256, 3, 3)
    assert atss_keys["atss_reg.weight"] == (4, 256, 3, 3)
    assert atss_keys["atss_centerness.weight"] == (1, 256, 3, 3)
    assert all(atss_keys[f"scales.{i}.scale"] == (1,) for i in range(6))  # reference: 0-d (converted on load)
    assert len(atss_keys) == 12 + 6 and "cls_convs.0.conv.bias" not in atss_keys
    assert float(atss.atss_cls.bias[0].detach()) == pytest.approx(
        -4.59512, abs=1e-4
    )  # prior probability 0.01


def test_rpn_losses_and_proposals():
    rpn, _, _ = _heads()
    losses, proposals = rpn.loss_and_proposals(_pyramid(), SIZES, _agnostic(_targets()))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_bbox"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    for props, (h, w) in zip(proposals, SIZES.tolist()):
        assert 0 < len(props) <= 1000 and not props.requires_grad
        assert (props[:, 0] >= 0).all() and (props[:, 2] <= w).all() and (props[:, 3] <= h).all()
        assert ((props[:, 2:] - props[:, :2]) > 0).all()


def test_roi_head_positive_set_layout():
    rpn, roi, _ = _heads()
    feats, targets = _pyramid(), _targets()
    _, proposals = rpn.loss_and_proposals(feats, SIZES, _agnostic(targets))
    losses, found = roi.loss(feats[:5], proposals, SIZES, targets)
    assert set(losses) == {"loss_cls", "loss_bbox", "acc"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    assert 0 <= float(losses["acc"]) <= 100
    assert isinstance(found, PositiveSet) and len(found.coords) == 2
    n = len(found.coords[0])
    assert n == 64 and all(len(c) == n for c in found.coords + found.labels + found.targets)
    for coords, labels, boxes, target in zip(found.coords, found.labels, found.targets, targets):
        num_pos = int((labels < K).sum())
        assert num_pos >= len(target["labels"])  # every GT box is a candidate of itself
        assert (labels[:num_pos] < K).all() and (labels[num_pos:] == K).all()  # positives first
        assert (boxes[num_pos:] == 0).all()
        for gt_box, gt_label in zip(target["boxes"], target["labels"]):
            same = (coords[:num_pos] == gt_box).all(dim=1)
            assert same.any() and (labels[:num_pos][same] == gt_label).all()
            assert (boxes[:num_pos][same] == gt_box).all()


def test_atss_positive_set_has_every_anchor_with_invalid_ones_zeroed():
    _, _, atss = _heads()
    losses, found = atss.loss(_pyramid(), SIZES, _targets())
    assert set(losses) == {"loss_cls", "loss_bbox", "loss_centerness"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in losses.values())
    total = sum(h * w for h, w in LEVELS)
    assert all(c.shape == (total, 4) for c in found.coords)
    # image 1 is 64 x 100 inside 96 x 128: level-0 rows 16.. and cols 25.. are invalid -> zero boxes, label K
    level0 = found.coords[1][: 24 * 32].view(24, 32, 4)
    assert (
        (level0[16:] == 0).all() and (level0[:, 25:] == 0).all() and (level0[:16, :25] != 0).any(dim=-1).all()
    )
    assert (found.labels[1][: 24 * 32].view(24, 32)[16:] == K).all()
    for labels, boxes, target in zip(found.labels, found.targets, _targets()):
        pos = labels < K
        assert pos.any()
        assert (boxes[~pos] == 0).all()
        for box, label in zip(boxes[pos], labels[pos]):
            match = (target["boxes"] == box).all(dim=1)
            assert match.any() and target["labels"][match][0] == label


def test_images_without_gt():
    rpn, roi, atss = _heads()
    feats, targets = _pyramid(), _targets(empty_second=True)
    rpn_losses, proposals = rpn.loss_and_proposals(feats, SIZES, _agnostic(targets))
    roi_losses, roi_found = roi.loss(feats[:5], proposals, SIZES, targets)
    atss_losses, atss_found = atss.loss(feats, SIZES, targets)
    for losses in (rpn_losses, roi_losses, atss_losses):
        assert all(torch.isfinite(v) for v in losses.values())
    assert (roi_found.labels[1] == K).all() and (atss_found.labels[1] == K).all()
    # a batch without any GT: regression terms are zero, classification stays finite (normaliser clamped)
    empty = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2
    atss_losses, _ = atss.loss(feats, SIZES, empty)
    assert atss_losses["loss_bbox"].item() == 0 and atss_losses["loss_centerness"].item() == 0
    assert torch.isfinite(atss_losses["loss_cls"]) and atss_losses["loss_cls"].item() > 0
    rpn_losses, proposals = rpn.loss_and_proposals(feats, SIZES, empty)
    roi_losses, _ = roi.loss(feats[:5], proposals, SIZES, empty)
    assert rpn_losses["loss_rpn_bbox"].item() == 0 and roi_losses["loss_bbox"].item() == 0
    assert torch.isfinite(roi_losses["loss_cls"])


@pytest.mark.parametrize("head_name", ["rpn", "roi", "atss"])
def test_gradients_flow_into_the_features(head_name):
    rpn, roi, atss = _heads()
    feats, targets = _pyramid(requires_grad=True), _targets()
    if head_name == "rpn":
        losses, _ = rpn.loss_and_proposals(feats, SIZES, _agnostic(targets))
        used = feats
    elif head_name == "roi":
        with torch.no_grad():
            _, proposals = rpn.loss_and_proposals(feats, SIZES, _agnostic(targets))
        losses, _ = roi.loss(feats[:5], proposals, SIZES, targets)
        used = feats[:1]  # small RoIs map to the finest level
    else:
        losses, _ = atss.loss(feats, SIZES, targets)
        used = feats
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert any(f.grad is not None and f.grad.abs().sum() > 0 for f in used)
    if head_name == "atss":
        assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in feats)
    head = {"rpn": rpn, "roi": roi, "atss": atss}[head_name]
    assert all(p.grad is not None for p in head.parameters())


def test_losses_are_float32_under_bf16_autocast():
    rpn, roi, atss = _heads()
    feats, targets = _pyramid(), _targets()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rpn_losses, proposals = rpn.loss_and_proposals(feats, SIZES, _agnostic(targets))
        roi_losses, _ = roi.loss(feats[:5], proposals, SIZES, targets)
        atss_losses, _ = atss.loss(feats, SIZES, targets)
    for losses in (rpn_losses, roi_losses, atss_losses):
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())


def test_debug_predict_outputs():
    rpn, roi, atss = _heads()
    feats = _pyramid()
    with torch.no_grad():
        one = atss.predict(feats, SIZES)
        two = roi.predict(feats[:5], [p[0] for p in rpn.predict(feats, SIZES)], SIZES)
    for results in (one, two):
        for res, (h, w) in zip(results, SIZES.tolist()):
            assert len(res["boxes"]) <= 100 and res["labels"].max() < K
            assert (res["boxes"][:, 2] <= w).all() and (res["boxes"][:, 3] <= h).all()
            assert torch.equal(res["scores"], res["scores"].sort(descending=True).values)


@pytest.mark.parametrize("split_threshold", [10000, 1])
def test_grouped_nms_matches_torchvision_without_ties(split_threshold):
    gen = torch.Generator().manual_seed(3)
    xy = torch.rand(300, 2, generator=gen) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(300, 2, generator=gen) * 60], 1)
    scores = torch.rand(300, generator=gen)
    groups = torch.randint(0, 4, (300,), generator=gen)
    keep = grouped_nms(boxes, scores, groups, 0.5, split_threshold=split_threshold)
    assert torch.equal(keep, batched_nms(boxes, scores, groups, 0.5))


def _greedy_nms_in_order(boxes, order, iou_threshold):
    """Plain greedy NMS visiting candidates in ``order`` (what the reference's CPU kernel does after its sort)."""
    from torchvision.ops import box_iou

    keep, suppressed = [], torch.zeros(len(boxes), dtype=torch.bool)
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= box_iou(boxes[i : i + 1], boxes)[0] >= iou_threshold
    return torch.tensor(keep)


def test_grouped_nms_breaks_exact_ties_like_the_reference_sort():
    """Anchors over the zero-padded part of an image get exactly equal RPN scores. Which of them survive NMS (and
    in which order they reach the RoI sampler) is decided by the reference kernel's non-stable descending sort;
    a stable sort (torchvision's own) keeps other boxes. Overlapping tied boxes make the difference visible."""
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(4000, 2, generator=gen) * 300
    boxes = torch.cat([xy, xy + 40], 1)
    scores = torch.rand(4000, generator=gen).mul(8).floor() / 8  # eight tied values
    keep = grouped_nms(boxes, scores, torch.zeros(4000, dtype=torch.long), 0.7)
    reference = _greedy_nms_in_order(boxes, scores.sort(descending=True)[1], 0.7)
    stable = _greedy_nms_in_order(boxes, scores.sort(descending=True, stable=True)[1], 0.7)
    assert torch.equal(keep, reference)
    assert not torch.equal(reference, stable)  # the case does separate the two tie orders
