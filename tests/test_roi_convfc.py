"""The ViT-L COCO RoI box head (4 shared convs + GN, 1 fc, class-agnostic regression): layout and mmdet key names,
forward against a functional re-computation, class-agnostic losses / predictions / positives against an equivalent
class-specific head, the recipe's config, and conversion of an mmdet-named state dict."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torchvision.ops import generalized_box_iou_loss

from codetr.checkpoint_io import load_detector_weights
from codetr.convert import convert_state_dict
from codetr.models.heads.roi_bbox_head import ConvFCBBoxHead
from codetr.models.heads.roi_head import RoIHead
from codetr.models.heads.rpn_head import RPNHead

C, K = 32, 5
SIZES = torch.tensor([[96, 128], [64, 100]])
LEVELS = [(24, 32), (12, 16), (6, 8), (3, 4), (2, 2)]
TARGETS = [
    {"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0], [60.0, 20.0, 120.0, 90.0]]), "labels": torch.tensor([1, 3])},
    {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2])},
]
VIT_HEAD = {"num_shared_convs": 4, "num_shared_fcs": 1, "reg_class_agnostic": True,
            "target_stds": (0.05, 0.05, 0.1, 0.1)}


def _pyramid(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2, C, h, w, generator=gen) for h, w in LEVELS]


def _proposals():
    torch.manual_seed(3)
    feats = _pyramid() + [torch.randn(2, C, 1, 1)]
    with torch.no_grad():
        return [p[0] for p in RPNHead(in_channels=C, feat_channels=C).predict(feats, SIZES)]


def test_vit_l_head_has_the_mmdet_layout_and_names():
    head = ConvFCBBoxHead(num_shared_convs=4, num_shared_fcs=1, reg_class_agnostic=True)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    expected = {}
    for i in range(4):
        expected |= {f"shared_convs.{i}.conv.weight": (256, 256, 3, 3), f"shared_convs.{i}.gn.weight": (256,),
                     f"shared_convs.{i}.gn.bias": (256,)}
    expected |= {"shared_fcs.0.weight": (1024, 12544), "shared_fcs.0.bias": (1024,), "fc_cls.weight": (81, 1024),
                 "fc_cls.bias": (81,), "fc_reg.weight": (4, 1024), "fc_reg.bias": (4,)}
    assert shapes == expected
    # The defaults are the R50 / Swin-L Shared2FC layout (no convs, 2 fcs, 4K deltas).
    default = ConvFCBBoxHead()
    assert {k for k in default.state_dict() if "conv" in k} == set()
    assert len(default.shared_fcs) == 2 and default.fc_reg.out_features == 320


def test_forward_equals_functional_recomputation():
    torch.manual_seed(0)
    head = ConvFCBBoxHead(C, 7, 24, K, num_shared_convs=2, conv_channels=32, norm_groups=8, num_shared_fcs=1,
                          reg_class_agnostic=True)
    for p in head.parameters():  # non-trivial norm affine parameters and biases
        torch.nn.init.normal_(p, std=0.1)
    rois = torch.randn(6, C, 7, 7)
    x = rois
    for block in head.shared_convs:
        x = F.conv2d(x, block.conv.weight, padding=1)
        x = F.relu(F.group_norm(x, 8, block.gn.weight, block.gn.bias, eps=1e-5))
    x = F.relu(F.linear(x.flatten(1), head.shared_fcs[0].weight, head.shared_fcs[0].bias))
    logits, deltas = head(rois)
    torch.testing.assert_close(logits, F.linear(x, head.fc_cls.weight, head.fc_cls.bias), rtol=0, atol=1e-6)
    torch.testing.assert_close(deltas, F.linear(x, head.fc_reg.weight, head.fc_reg.bias), rtol=0, atol=1e-6)
    assert logits.shape == (6, K + 1) and deltas.shape == (6, 4)


def _agnostic_and_replicated_heads():
    """A class-agnostic RoI head and a class-specific copy whose regressor repeats the agnostic one per class."""
    torch.manual_seed(1)
    agnostic = RoIHead(num_classes=K, in_channels=C, fc_channels=16, num_samples=64, conv_channels=16,
                       norm_groups=4, **VIT_HEAD)
    torch.nn.init.normal_(agnostic.bbox_head.fc_reg.weight, std=0.05)  # visible deltas
    torch.nn.init.normal_(agnostic.bbox_head.fc_reg.bias, std=0.05)
    specific = RoIHead(num_classes=K, in_channels=C, fc_channels=16, num_samples=64, conv_channels=16,
                       norm_groups=4, **{**VIT_HEAD, "reg_class_agnostic": False})
    state = copy.deepcopy(agnostic.state_dict())
    state["bbox_head.fc_reg.weight"] = state["bbox_head.fc_reg.weight"].repeat(K, 1)
    state["bbox_head.fc_reg.bias"] = state["bbox_head.fc_reg.bias"].repeat(K)
    specific.load_state_dict(state)
    return agnostic, specific


def test_class_agnostic_losses_positives_and_predictions_equal_a_replicated_class_specific_head():
    agnostic, specific = _agnostic_and_replicated_heads()
    feats, proposals = _pyramid(), _proposals()
    results = []
    for head in (agnostic, specific):
        torch.manual_seed(7)  # same sampler draws
        losses, positives = head.loss(feats, proposals, SIZES, TARGETS)
        results.append((losses, positives, head.predict(feats, proposals, SIZES)))
    (la, pa, da), (ls, ps, ds) = results
    assert float(la["loss_bbox"].detach()) > 0
    for key in ("loss_cls", "loss_bbox", "acc"):
        torch.testing.assert_close(la[key], ls[key], rtol=0, atol=1e-6)
    for a, s in zip(pa.coords + pa.labels + pa.targets, ps.coords + ps.labels + ps.targets):
        assert torch.equal(a, s)
    for a, s in zip(da, ds):
        for key in ("boxes", "scores", "labels"):
            torch.testing.assert_close(a[key], s[key], rtol=0, atol=1e-5)


def test_class_agnostic_box_loss_by_hand():
    agnostic, _ = _agnostic_and_replicated_heads()
    feats, proposals = _pyramid(), _proposals()
    torch.manual_seed(7)
    losses, positives = agnostic.loss(feats, proposals, SIZES, TARGETS)
    rois = torch.cat([torch.cat([c.new_full((len(c), 1), i), c], 1) for i, c in enumerate(positives.coords)])
    labels, targets = torch.cat(positives.labels), torch.cat(positives.targets)
    _, deltas = agnostic.bbox_head(agnostic.roi_features(feats, rois))
    pos = labels < K
    # DeltaXYWH decoding written out with the ViT-L stds (0.05, 0.05, 0.1, 0.1).
    d = deltas[pos] * torch.tensor([0.05, 0.05, 0.1, 0.1])
    r = rois[pos, 1:]
    w, h = r[:, 2] - r[:, 0], r[:, 3] - r[:, 1]
    cx, cy = r[:, 0] + 0.5 * w + d[:, 0] * w, r[:, 1] + 0.5 * h + d[:, 1] * h
    bw, bh = w * d[:, 2].exp(), h * d[:, 3].exp()
    boxes = torch.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], 1)
    expected = 120.0 * generalized_box_iou_loss(boxes, targets[pos], reduction="sum") / len(rois)
    torch.testing.assert_close(losses["loss_bbox"], expected, rtol=1e-5, atol=1e-6)


def test_vit_l_coco_recipe_builds_the_convfc_head(compose_cfg):
    cfg = compose_cfg("train", ["experiment=co_dino_vit_l_coco"])
    head = instantiate(cfg.model.detector.roi_head[0])
    assert len(head.bbox_head.shared_convs) == 4 and len(head.bbox_head.shared_fcs) == 1
    assert head.bbox_head.reg_class_agnostic and head.bbox_head.fc_reg.out_features == 4
    assert head.coder.stds == (0.05, 0.05, 0.1, 0.1)
    for experiment in ("co_dino_vit_l_lvis", "co_dino_r50_lsj_1x", "co_dino_swin_l_lsj_3x"):
        roi = compose_cfg("train", [f"experiment={experiment}"]).model.detector.roi_head[0]
        assert (roi.num_shared_convs, roi.num_shared_fcs, roi.reg_class_agnostic) == (0, 2, False)
        assert list(roi.target_stds) == [0.1, 0.1, 0.2, 0.2]


def test_mmdet_named_state_dict_converts_and_class_change_keeps_the_agnostic_regressor():
    head = RoIHead(num_classes=K, in_channels=C, fc_channels=16, conv_channels=16, norm_groups=4, **VIT_HEAD)
    mmdet = {f"roi_head.0.{k}": v.clone() for k, v in head.state_dict().items()}
    mmdet["query_head.cls_branches.0.weight"] = torch.zeros(K, 8)  # where convert reads the class count
    conversion = convert_state_dict(mmdet)
    assert conversion.renamed == {} and set(conversion.state_dict) == set(mmdet)
    target = torch.nn.Module()
    target.roi_head = torch.nn.ModuleList([RoIHead(num_classes=K, in_channels=C, fc_channels=16, conv_channels=16,
                                                   norm_groups=4, **VIT_HEAD)])
    state = {k: v for k, v in conversion.state_dict.items() if k.startswith("roi_head.")}
    assert load_detector_weights(target, state) == []
    for key, value in target.roi_head[0].state_dict().items():
        assert torch.equal(value, head.state_dict()[key]), key

    changed = convert_state_dict(mmdet, num_classes=K + 3)
    assert {"roi_head.0.bbox_head.fc_cls.weight", "roi_head.0.bbox_head.fc_cls.bias"} <= set(
        changed.dropped_class_dependent)
    assert "roi_head.0.bbox_head.fc_reg.weight" in changed.state_dict  # 4 outputs whatever K is
    # A class-specific regressor of a 1-class model also has 4 outputs: it is dropped, not kept.
    one = dict(mmdet, **{"query_head.cls_branches.0.weight": torch.zeros(1, 8)})
    assert "roi_head.0.bbox_head.fc_reg.weight" in convert_state_dict(one, num_classes=80).dropped_class_dependent
