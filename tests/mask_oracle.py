"""Access to the Co-DINO-Inst oracle (numbers from the official Sense-X code, ``tools/oracle/gen_co_dino_inst.py``) for
the mask-branch parity tests.

The directory comes from ``CODETR_ORACLE_MASK_DIR`` (default: the copy committed with the tests,
``tests/data/oracle_co_dino_inst``). The detector is built from the oracle's own mmdet config (``tiny_config.json``):
ViT + SFP, the Co-DINO query head with the original repository's settings (soft-NMS over ``num_query`` candidates,
``sync_cls_avg_factor`` as configured), the RPN / RoI / ATSS auxiliary heads and the mask branch; widths, counts,
sizes and loss weights all come from there.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "tests" / "data" / "oracle_co_dino_inst"
NEEDED = ("tiny_config.json", "tiny_state_dict.pth", "tiny_inputs.pth", "tiny_outputs.pth")


def mask_oracle_dir() -> Path:
    return Path(os.environ.get("CODETR_ORACLE_MASK_DIR", DEFAULT))


def require_mask_oracle() -> Path:
    path = mask_oracle_dir()
    missing = [n for n in NEEDED if not (path / n).exists()]
    if missing:
        pytest.skip(f"oracle data not found in {path} (missing {', '.join(missing)}); set CODETR_ORACLE_MASK_DIR")
    return path


@cache
def load(name: str):
    path = require_mask_oracle() / name
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, weights_only=True, map_location="cpu")


def model_cfg() -> dict:
    return load("tiny_config.json")["model_cfg"]


def unpack(packed: dict) -> torch.Tensor:
    """``{"bits", "shape"}`` (np.packbits of a bool array) -> bool tensor."""
    count = int(np.prod(packed["shape"]))
    bits = np.unpackbits(packed["bits"].numpy())[:count]
    return torch.from_numpy(bits.reshape(packed["shape"]).astype(bool))


def image_sizes() -> torch.Tensor:
    return torch.tensor([list(m["img_shape"][:2]) for m in load("tiny_inputs.pth")["img_metas"]], dtype=torch.long)


def targets(record: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """GT boxes / labels / masks (on each image's padded canvas) of the inputs, or those a train record used."""
    inputs = load("tiny_inputs.pth")
    record = record or {}
    boxes = record.get("gt_bboxes_used", inputs["gt_bboxes"])
    labels = record.get("gt_labels_used", inputs["gt_labels"])
    masks = record.get("gt_masks_used", inputs["gt_masks"])
    return [{"boxes": b.float(), "labels": lab.long(), "masks": m.bool()} for b, lab, m in zip(boxes, labels, masks)]


def build_vit(cfg: dict):
    from codetr.models.backbones.vit import ViT

    b = cfg["backbone"]
    windowed = set(b.get("window_block_indexes", ()))
    return ViT(
        img_size=b["img_size"], patch_size=b["patch_size"], embed_dim=b["embed_dim"], depth=b["depth"],
        num_heads=b["num_heads"], mlp_ratio=b["mlp_ratio"], window_size=b["window_size"],
        global_attn_indexes=[i for i in range(b["depth"]) if i not in windowed],
        drop_path_rate=b.get("drop_path_rate", 0.0), pretrain_img_size=b.get("pretrain_img_size", 224),
        pretrain_use_cls_token=b.get("pretrain_use_cls_token", True), use_lsj=b.get("use_lsj", False),
        pt_hw_seq_len=b.get("pt_hw_seq_len", 16), qkv_bias=b.get("qkv_bias", True),
    )


def build_query_head(cfg: dict, attention_impl: str = "pytorch"):
    """CoDINOHead + DinoTransformer from an original-repository (mmdet 2.x) CoDINOHead config."""
    from aux_oracle import head_slots

    from codetr.models.heads.co_dino_head import CoDINOHead
    from codetr.models.transformer.dino_transformer import DinoTransformer

    head = cfg["query_head"]
    tr = head["transformer"]
    enc_layer, dec_layer = tr["encoder"]["transformerlayers"], tr["decoder"]["transformerlayers"]
    enc_attn = enc_layer["attn_cfgs"]
    dec_attns = dec_layer["attn_cfgs"]
    assert dec_attns[1]["num_points"] == enc_attn.get("num_points", 4)
    transformer = DinoTransformer(
        embed_dims=enc_attn["embed_dims"], num_heads=enc_attn.get("num_heads", 8),
        num_levels=tr.get("num_feature_levels", head.get("num_feature_levels")),
        num_points=enc_attn.get("num_points", 4),
        num_encoder_layers=tr["encoder"]["num_layers"], num_decoder_layers=tr["decoder"]["num_layers"],
        ffn_dims=enc_layer.get("ffn_cfgs", {}).get("feedforward_channels", enc_layer.get("feedforward_channels")),
        num_queries=head["num_query"], num_co_heads=tr.get("num_co_heads", 2), attention_impl=attention_impl,
    )
    dn = head["dn_cfg"]
    assigner = cfg["train_cfg"][head_slots(cfg)["query"]]["assigner"]
    test = cfg["test_cfg"][head_slots(cfg)["query"]]
    nms = test.get("nms")
    return CoDINOHead(
        num_classes=head["num_classes"], transformer=transformer,
        positional_temperature=head["positional_encoding"].get("temperature", 10000),
        label_noise_scale=dn["noise_scale"]["label"], box_noise_scale=dn["noise_scale"]["box"],
        num_dn_queries=dn["group_cfg"]["num_dn_queries"],
        loss_cls_weight=head["loss_cls"]["loss_weight"], loss_bbox_weight=head["loss_bbox"]["loss_weight"],
        loss_iou_weight=head["loss_iou"]["loss_weight"], qfl_beta=head["loss_cls"].get("beta", 2.0),
        match_class_weight=assigner["cls_cost"]["weight"], match_l1_weight=assigner["reg_cost"]["weight"],
        match_giou_weight=assigner["iou_cost"]["weight"], max_pos_queries=head.get("max_pos_coords", 300),
        max_per_image=test["max_per_img"], soft_nms_iou=nms["iou_threshold"] if nms else None,
        candidates_before_nms=head["num_query"],  # the original repo's test path: num_query candidates enter NMS
        sync_cls_avg_factor=head.get("sync_cls_avg_factor", False),
    )


def build_mask_branch(cfg: dict):
    from aux_oracle import head_slots

    from codetr.models.assigners import MaxIoUAssigner
    from codetr.models.heads.mask_branch import MaskBranch
    from codetr.models.heads.mask_iou_head import MaskIoUHead
    from codetr.models.heads.refine_mask_head import SimpleRefineMaskHead
    from codetr.models.losses.bar_loss import BARCrossEntropyLoss
    from codetr.models.roi_extractor import MultiLevelRoIExtractor
    from codetr.models.samplers import RandomSampler

    slots = head_slots(cfg)
    extractor, mh, mi = cfg["mask_roi_extractor"], cfg["mask_head"], cfg.get("mask_iou_head")
    train, test = cfg["train_cfg"][slots["mask"]], cfg["test_cfg"][slots["mask"]]
    assert mh["type"] == "SimpleRefineMaskHead" and mh["fusion_type"] == "MultiBranchFusionAvg"
    assert mh["conv_out_channels_instance"] == mh["conv_out_channels_semantic"]
    head = SimpleRefineMaskHead(
        in_channels=mh["conv_in_channels_instance"], channels=mh["conv_out_channels_instance"],
        stage_sizes=mh["stage_sup_size"], stage_num_classes=mh["stage_num_classes"],
        num_instance_convs=mh["num_convs_instance"], num_semantic_convs=mh["num_convs_semantic"],
        semantic_stride=mh["semantic_out_stride"], dilations=mh["dilations"],
        pre_upsample_last_stage=mh.get("pre_upsample_last_stage", False),
    )
    iou_head = None
    if mi:
        iou_head = MaskIoUHead(mi["in_channels"], mi["roi_feat_size"], mi["num_classes"], mi["num_convs"],
                               mi["num_fcs"], mi["conv_out_channels"], mi["fc_out_channels"],
                               mi.get("score_use_sigmoid", False))
    loss = mh["loss_cfg"]
    a, s = train["assigner"], train["sampler"]
    query_test = cfg["test_cfg"][slots["query"]]
    return MaskBranch(
        roi_extractor=MultiLevelRoIExtractor(extractor["featmap_strides"], extractor["roi_layer"]["output_size"],
                                             extractor["roi_layer"].get("sampling_ratio", 0),
                                             extractor.get("finest_scale", 56)),
        mask_head=head,
        loss=BARCrossEntropyLoss(loss["stage_instance_loss_weight"], loss["boundary_width"], loss["start_stage"]),
        assigner=MaxIoUAssigner(a["pos_iou_thr"], a["neg_iou_thr"], a["min_pos_iou"], a["match_low_quality"]),
        sampler=RandomSampler(s["num"], s["pos_fraction"], s.get("neg_pos_ub", -1), s["add_gt_as_proposals"]),
        mask_iou_head=iou_head, loss_weight=mh.get("loss_weight", 1.0),
        iou_loss_weight=mi["loss_iou"]["loss_weight"] if mi else 0.0,
        train_detections=query_test["max_per_img"], mask_threshold=test["mask_thr_binary"],
    )


def pad_size_divisor() -> int:
    """The pipeline's ``Pad(size_divisor)`` of the recorded inputs (each image's ``pad_shape``)."""
    return int(load("tiny_inputs.pth").get("pad_size_divisor", 1))


def build_detector(cfg: dict | None = None, attention_impl: str = "pytorch"):
    """The codetr detector of the oracle's config with the oracle's weights (converted, loaded strictly)."""
    from aux_oracle import build_atss, build_roi, build_rpn, dense_heads_filter_small_boxes

    from codetr.convert import convert_state_dict
    from codetr.models.co_detr import CoDETR
    from codetr.models.necks import SFP
    from codetr.models.postprocess import PostProcessor

    cfg = cfg or model_cfg()
    neck = cfg["neck"]
    sfp = SFP(neck["in_channels"], neck["out_channels"], neck["num_outs"], neck.get("use_p2", True))
    query_head = build_query_head(cfg, attention_impl)
    filter_small = dense_heads_filter_small_boxes(load("tiny_outputs.pth")["meta"])
    postprocessor = PostProcessor(query_head.max_per_image, query_head.soft_nms_iou, query_head.soft_nms_min_score,
                                  query_head.candidates_before_nms)
    detector = CoDETR(build_vit(cfg), sfp, query_head, rpn_head=build_rpn(cfg), roi_head=[build_roi(cfg)],
                      bbox_head=[build_atss(cfg, filter_small)], postprocessor=postprocessor,
                      mask_branch=build_mask_branch(cfg), pad_size_divisor=pad_size_divisor())
    converted = convert_state_dict(load("tiny_state_dict.pth"),
                                   expected={k: v.shape for k, v in detector.state_dict().items()})
    detector.load_state_dict(converted.state_dict, strict=True)
    return detector
