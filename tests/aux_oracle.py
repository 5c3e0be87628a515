"""Builders shared by the auxiliary-head oracle tests: the tiny RPN / RoI / ATSS heads from the oracle's own mmdet
config (so a held-out oracle with other widths or hyper-parameters runs unchanged), their weights, and the
6-level auxiliary pyramid rebuilt from the oracle's encoder memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from oracle_support import load, model_cfg
from torch import Tensor

from codetr.models.heads.atss_head import ATSSHead
from codetr.models.heads.roi_head import RoIHead
from codetr.models.heads.rpn_head import RPNHead


def _anchor_kwargs(gen: dict) -> dict:
    return {
        "strides": gen["strides"],
        "ratios": gen["ratios"],
        "octave_base_scale": gen["octave_base_scale"],
        "scales_per_octave": gen["scales_per_octave"],
    }


def head_slots(cfg: dict) -> dict[str, int | None]:
    """Indices into ``train_cfg`` / ``test_cfg`` as the reference's ``CoDETR.__init__`` assigns them: the query
    head first, then the mask branch (when configured), then the RPN / RoI heads, then the dense heads."""
    index, slots = 1, {"query": 0, "mask": None}
    if cfg.get("mask_head"):
        slots["mask"], index = index, index + 1
    slots["rcnn"] = index
    slots["dense"] = index + len([h for h in cfg.get("roi_head", []) if h])
    return slots


def build_rpn(cfg: dict | None = None) -> RPNHead:
    cfg = cfg or model_cfg()
    slot = head_slots(cfg)["rcnn"]
    head, train, test = cfg["rpn_head"], cfg["train_cfg"][slot], cfg["test_cfg"][slot]["rpn"]
    assigner, sampler, proposal = train["rpn"]["assigner"], train["rpn"]["sampler"], train["rpn_proposal"]
    return RPNHead(
        in_channels=head["in_channels"],
        feat_channels=head["feat_channels"],
        **_anchor_kwargs(head["anchor_generator"]),
        target_stds=head["bbox_coder"]["target_stds"],
        pos_iou_thr=assigner["pos_iou_thr"],
        neg_iou_thr=assigner["neg_iou_thr"],
        min_pos_iou=assigner["min_pos_iou"],
        match_low_quality=assigner["match_low_quality"],
        num_samples=sampler["num"],
        pos_fraction=sampler["pos_fraction"],
        loss_cls_weight=head["loss_cls"]["loss_weight"],
        loss_bbox_weight=head["loss_bbox"]["loss_weight"],
        train_nms_pre=proposal["nms_pre"],
        train_max_per_img=proposal["max_per_img"],
        test_nms_pre=test["nms_pre"],
        test_max_per_img=test["max_per_img"],
        nms_iou=proposal["nms"]["iou_threshold"],
        min_bbox_size=proposal["min_bbox_size"],
    )


def build_roi(cfg: dict | None = None) -> RoIHead:
    cfg = cfg or model_cfg()
    roi = cfg["roi_head"][0]
    head, extractor = roi["bbox_head"], roi["bbox_roi_extractor"]
    slot = head_slots(cfg)["rcnn"]
    train, test = cfg["train_cfg"][slot]["rcnn"], cfg["test_cfg"][slot]["rcnn"]
    return RoIHead(
        num_classes=head["num_classes"],
        in_channels=head["in_channels"],
        fc_channels=head["fc_out_channels"],
        strides=extractor["featmap_strides"],
        roi_size=extractor["roi_layer"]["output_size"],
        sampling_ratio=extractor["roi_layer"]["sampling_ratio"],
        finest_scale=extractor["finest_scale"],
        pos_iou_thr=train["assigner"]["pos_iou_thr"],
        neg_iou_thr=train["assigner"]["neg_iou_thr"],
        min_pos_iou=train["assigner"]["min_pos_iou"],
        match_low_quality=train["assigner"]["match_low_quality"],
        num_samples=train["sampler"]["num"],
        pos_fraction=train["sampler"]["pos_fraction"],
        add_gt_as_proposals=train["sampler"]["add_gt_as_proposals"],
        target_stds=head["bbox_coder"]["target_stds"],
        loss_cls_weight=head["loss_cls"]["loss_weight"],
        loss_bbox_weight=head["loss_bbox"]["loss_weight"],
        test_score_thr=test["score_thr"],
        test_nms_iou=test["nms"]["iou_threshold"],
        test_max_per_img=test["max_per_img"],
        num_shared_convs=head.get("num_shared_convs", 0),
        conv_channels=head.get("conv_out_channels", head["in_channels"]),
        norm_groups=(head.get("norm_cfg") or {}).get("num_groups", 32),
        num_shared_fcs=head.get("num_shared_fcs", 2),
        reg_class_agnostic=head.get("reg_class_agnostic", False),
    )


def dense_heads_filter_small_boxes(meta: dict) -> bool:
    """Whether the oracle's mmdet drops boxes of size <= ``min_bbox_size`` in a dense head's test path: mmdet 3.x
    does, the mmdet 2.x of the original Co-DETR code ignores the setting (``BaseDenseHead._bbox_post_process``)."""
    versions = meta.get("versions", {})
    mmdet = str(versions.get("mmdet", versions.get("mmdet_vendored", "3")))
    return not mmdet.startswith("2.")


def build_atss(cfg: dict | None = None, filter_small_boxes: bool = True) -> ATSSHead:
    """The ATSS head of ``cfg``; ``filter_small_boxes`` False for oracles of mmdet 2.x code (see
    :func:`dense_heads_filter_small_boxes`)."""
    cfg = cfg or model_cfg()
    slot = head_slots(cfg)["dense"]
    head, train, test = cfg["bbox_head"][0], cfg["train_cfg"][slot], cfg["test_cfg"][slot]
    return ATSSHead(
        num_classes=head["num_classes"],
        in_channels=head["in_channels"],
        feat_channels=head["feat_channels"],
        stacked_convs=head["stacked_convs"],
        **_anchor_kwargs(head["anchor_generator"]),
        topk=train["assigner"]["topk"],
        target_stds=head["bbox_coder"]["target_stds"],
        focal_alpha=head["loss_cls"]["alpha"],
        focal_gamma=head["loss_cls"]["gamma"],
        loss_cls_weight=head["loss_cls"]["loss_weight"],
        loss_bbox_weight=head["loss_bbox"]["loss_weight"],
        loss_centerness_weight=head["loss_centerness"]["loss_weight"],
        test_nms_pre=test["nms_pre"],
        test_score_thr=test["score_thr"],
        test_nms_iou=test["nms"]["iou_threshold"],
        test_max_per_img=test["max_per_img"],
        min_bbox_size=test["min_bbox_size"] if filter_small_boxes else None,
    )


def load_prefixed(module: torch.nn.Module, prefix: str) -> None:
    state = load("tiny_state_dict.pth")
    module.load_state_dict(
        {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True
    )


def aux_pyramid(requires_grad: bool = False) -> tuple[list[Tensor], list[Tensor]]:
    """(pyramid, leaves): the oracle memory split into its 5 levels (B, C, h, w) plus level 6 from the query head's
    ``downsample`` (conv 3x3 s2 + GroupNorm) with the oracle weights; ``leaves`` are the tensors to check grads on."""
    memory = load("tiny_outputs.pth")["eval"]["memory"].clone()
    shapes = load("tiny_intermediates.pth")["encoder.in.spatial_shapes"].tolist()
    memory.requires_grad_(requires_grad)
    batch, _, channels = memory.shape
    levels, start = [], 0
    for h, w in shapes:
        levels.append(memory[:, start : start + h * w].permute(0, 2, 1).reshape(batch, channels, h, w))
        start += h * w
    state = load("tiny_state_dict.pth")
    x = F.conv2d(
        levels[-1],
        state["query_head.downsample.0.weight"],
        state["query_head.downsample.0.bias"],
        stride=2,
        padding=1,
    )
    x = F.group_norm(
        x,
        32,  # the query head's downsample uses GroupNorm(32)
        state["query_head.downsample.1.weight"],
        state["query_head.downsample.1.bias"],
    )
    return levels + [x], [memory]


class Recorder:
    """Wraps a sampler and keeps every ``SamplingResult`` it returns, in call order."""

    def __init__(self, sampler):
        self.sampler, self.results = sampler, []

    def __call__(self, *args, **kwargs):
        result = self.sampler(*args, **kwargs)
        self.results.append(result)
        return result
