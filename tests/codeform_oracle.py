"""Access to the Co-Deformable-DETR oracle (numbers from the official Sense-X code) for the parity tests.

The directory comes from ``CODETR_ORACLE_CODEFORM_DIR`` (default ``<repo>/../shared/oracle-codeform``). The model is
built from the oracle's own mmdet config (``tiny_config.json["model_cfg"]``), never from constants, so a held-out
reference with other widths, layer / head / point / query counts, loss weights or image sizes runs unchanged.
"""

from __future__ import annotations

import json
import math
import os
from functools import cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NEEDED = ("tiny_config.json", "tiny_state_dict.pth", "tiny_inputs.pth", "tiny_outputs.pth", "tiny_intermediates.pth")


def codeform_dir() -> Path:
    return Path(os.environ.get("CODETR_ORACLE_CODEFORM_DIR", REPO.parent / "shared" / "oracle-codeform"))


def require_codeform() -> Path:
    path = codeform_dir()
    missing = [n for n in NEEDED if not (path / n).exists()]
    if missing:
        pytest.skip(f"oracle data not found in {path} (missing {', '.join(missing)}); set CODETR_ORACLE_CODEFORM_DIR")
    return path


@cache
def load(name: str):
    path = require_codeform() / name
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, weights_only=True, map_location="cpu")


def model_cfg() -> dict:
    return load("tiny_config.json")["model_cfg"]


def image_sizes() -> torch.Tensor:
    return torch.tensor([list(m["img_shape"][:2]) for m in load("tiny_inputs.pth")["img_metas"]], dtype=torch.long)


def targets(record: dict | None = None) -> list[dict[str, torch.Tensor]]:
    """GT of the inputs, or the boxes a train record says it used (``train_det_empty_gt``)."""
    inputs = load("tiny_inputs.pth")
    record = record or {}
    boxes = record.get("gt_bboxes_used", inputs["gt_bboxes"])
    labels = record.get("gt_labels_used", inputs["gt_labels"])
    return [{"boxes": b.float(), "labels": lab.long()} for b, lab in zip(boxes, labels)]


def _layer_cfg(layers: dict) -> tuple[dict, int]:
    """(deformable attention cfg, FFN width) of an mmcv ``transformerlayers`` cfg."""
    attns = layers["attn_cfgs"]
    attns = attns if isinstance(attns, list) else [attns]
    deformable = next(a for a in attns if a["type"] == "MultiScaleDeformableAttention")
    ffn = layers.get("ffn_cfgs", {}).get("feedforward_channels", layers.get("feedforward_channels"))
    return deformable, ffn


def build_query_head(cfg: dict, attention_impl: str = "pytorch"):
    from codetr.models.heads.co_deformable_detr_head import CoDeformableDETRHead
    from codetr.models.losses.losses import SigmoidFocalLoss
    from codetr.models.losses.matcher import HungarianMatcher
    from codetr.models.losses.set_criterion import SetCriterion
    from codetr.models.transformer.deformable_transformer import CoDeformableTransformer
    from codetr.models.transformer.position import SinePositionalEncoding

    head = cfg["query_head"]
    tr = head["transformer"]
    enc_attn, enc_ffn = _layer_cfg(tr["encoder"]["transformerlayers"])
    dec_attn, dec_ffn = _layer_cfg(tr["decoder"]["transformerlayers"])
    assert enc_ffn == dec_ffn and enc_attn.get("num_points", 4) == dec_attn.get("num_points", 4)
    assert tr["decoder"].get("look_forward_twice") and head.get("with_box_refine") and head.get("as_two_stage")
    assert head.get("mixed_selection") and not head.get("use_zero_padding", False)
    num_levels = enc_attn.get("num_levels", 4)
    assert num_levels == tr.get("num_feature_levels", 4)
    transformer = CoDeformableTransformer(
        embed_dims=enc_attn["embed_dims"],
        num_heads=enc_attn.get("num_heads", 8),
        num_levels=num_levels,
        num_points=enc_attn.get("num_points", 4),
        num_encoder_layers=tr["encoder"]["num_layers"],
        num_decoder_layers=tr["decoder"]["num_layers"],
        ffn_dims=enc_ffn,
        num_co_heads=tr.get("num_co_heads", 1),
        attention_impl=attention_impl,
    )
    pe = head["positional_encoding"]
    positional = SinePositionalEncoding(
        pe["num_feats"], temperature=pe.get("temperature", 10000), normalize=pe.get("normalize", False),
        scale=pe.get("scale", 2 * math.pi), eps=pe.get("eps", 1e-6), offset=pe.get("offset", 0.0),
    )
    assigner = head["train_cfg"]["assigner"]
    cls_cost = assigner["cls_cost"]
    matcher = HungarianMatcher(
        cls_cost["weight"], assigner["reg_cost"]["weight"], assigner["iou_cost"]["weight"],
        cls_cost.get("alpha", 0.25), cls_cost.get("gamma", 2.0),
    )
    loss_cls = head["loss_cls"]
    assert loss_cls["type"] == "FocalLoss" and head["loss_iou"]["type"] == "GIoULoss"
    criterion = SetCriterion(
        head["num_classes"], matcher, loss_cls["loss_weight"], head["loss_bbox"]["loss_weight"],
        head["loss_iou"]["loss_weight"], sync_cls_avg_factor=head.get("sync_cls_avg_factor", False),
        classification=SigmoidFocalLoss(loss_cls.get("alpha", 0.25), loss_cls.get("gamma", 2.0)),
    )
    return CoDeformableDETRHead(
        head["num_classes"], transformer, positional, criterion,
        num_queries=head["num_query"],
        max_pos_queries=head.get("max_pos_coords", 300),
        aux_loss_weight=head.get("lambda_1", 1.0),
        max_per_image=head["test_cfg"]["max_per_img"],
    )


def build_detector(cfg: dict | None = None, with_aux: bool = True):
    """The codetr detector matching the oracle's config, the oracle weights converted by ``codetr.convert`` and
    loaded strictly (without the auxiliary heads' weights when ``with_aux`` is False)."""
    from aux_oracle import build_atss, build_roi, build_rpn, dense_heads_filter_small_boxes

    from codetr.convert import convert_state_dict
    from codetr.models.backbones.resnet import ResNet
    from codetr.models.co_detr import CoDETR
    from codetr.models.necks import ChannelMapper

    cfg = cfg or model_cfg()
    bb, neck = cfg["backbone"], cfg["neck"]
    backbone = ResNet(depth=bb["depth"], base_channels=bb.get("base_channels", 64),
                      frozen_stages=bb.get("frozen_stages", 1), out_indices=tuple(bb.get("out_indices", (0, 1, 2, 3))))
    mapper = ChannelMapper(neck["in_channels"], neck["out_channels"], neck.get("num_outs", 4),
                           neck.get("norm_cfg", {}).get("num_groups", 32), neck.get("kernel_size", 1))
    aux = {}
    if with_aux:
        filter_small = dense_heads_filter_small_boxes(load("tiny_outputs.pth")["meta"])
        aux = {"rpn_head": build_rpn(cfg), "roi_head": [build_roi(cfg)], "bbox_head": [build_atss(cfg, filter_small)]}
    detector = CoDETR(backbone, mapper, build_query_head(cfg), use_positive_queries=with_aux, **aux)
    state = load("tiny_state_dict.pth")
    if not with_aux:
        state = {k: v for k, v in state.items() if not k.startswith(("rpn_head.", "roi_head.", "bbox_head."))}
    converted = convert_state_dict(state, expected={k: v.shape for k, v in detector.state_dict().items()})
    detector.load_state_dict(converted.state_dict, strict=True)
    return detector
