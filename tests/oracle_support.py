"""Access to the oracle (numbers produced by the official Co-DINO implementation) for the parity tests.

The oracle directory comes from ``CODETR_ORACLE_DIR`` (default ``<repo>/../shared/oracle``). The model is built
from the oracle's own mmdet config (``tiny_config.json["model_cfg"]``), never from constants, so a held-out
reference set with other widths, layer / head / point counts, class counts or image sizes runs unchanged.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def oracle_dir() -> Path:
    return Path(os.environ.get("CODETR_ORACLE_DIR", REPO.parent / "shared" / "oracle"))


def require_oracle() -> Path:
    path = oracle_dir()
    needed = ["tiny_config.json", "tiny_state_dict.pth", "tiny_inputs.pth", "tiny_outputs.pth"]
    missing = [n for n in needed if not (path / n).exists()]
    if missing:
        pytest.skip(f"oracle data not found in {path} (missing {', '.join(missing)}); set CODETR_ORACLE_DIR")
    return path


@cache
def load(name: str):
    """``tiny_*.pth`` files hold python containers next to tensors: they are our own trusted test data."""
    path = require_oracle() / name
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, weights_only=False, map_location="cpu")


def model_cfg() -> dict:
    return load("tiny_config.json")["model_cfg"]


def _first(cfg, key):
    return cfg[0] if isinstance(cfg, list) else cfg


def query_head_kwargs(cfg: dict) -> tuple[dict, dict]:
    """(DinoTransformer kwargs, CoDINOHead kwargs) from an mmdet CoDINOHead config."""
    head = cfg["query_head"]
    transformer = head["transformer"]
    enc_layer = transformer["encoder"]["transformerlayers"]
    enc_attn = _first(enc_layer["attn_cfgs"], 0)
    dec_attns = transformer["decoder"]["transformerlayers"]["attn_cfgs"]
    cross = dec_attns[1] if isinstance(dec_attns, list) else dec_attns
    transformer_kwargs = {
        "embed_dims": enc_attn["embed_dims"],
        "num_heads": enc_attn["num_heads"],
        "num_levels": enc_attn["num_levels"],
        "num_points": enc_attn["num_points"],
        "num_encoder_layers": transformer["encoder"]["num_layers"],
        "num_decoder_layers": transformer["decoder"]["num_layers"],
        "ffn_dims": enc_layer["feedforward_channels"],
        "num_queries": head["num_query"],
        "num_co_heads": transformer.get("num_co_heads", 2),
    }
    assert cross["num_points"] == enc_attn["num_points"] and cross["num_levels"] == enc_attn["num_levels"]
    dn = head["dn_cfg"]
    costs = {c["type"]: c["weight"] for c in cfg["train_cfg"][0]["assigner"]["match_costs"]}
    test = cfg["test_cfg"][0]
    nms = test.get("nms")
    head_kwargs = {
        "num_classes": head["num_classes"],
        "positional_temperature": head["positional_encoding"].get("temperature", 10000),
        "label_noise_scale": dn["label_noise_scale"],
        "box_noise_scale": dn["box_noise_scale"],
        "num_dn_queries": dn["group_cfg"]["num_dn_queries"],
        "loss_cls_weight": head["loss_cls"]["loss_weight"],
        "loss_bbox_weight": head["loss_bbox"]["loss_weight"],
        "loss_iou_weight": head["loss_iou"]["loss_weight"],
        "qfl_beta": head["loss_cls"].get("beta", 2.0),
        "match_class_weight": costs["FocalLossCost"],
        "match_l1_weight": costs["BBoxL1Cost"],
        "match_giou_weight": costs["IoUCost"],
        "max_pos_queries": head.get("max_pos_coords", 300),
        "max_per_image": test.get("max_per_img", transformer_kwargs["num_queries"]),
        "soft_nms_iou": nms["iou_threshold"] if nms else None,
        "sync_cls_avg_factor": False,  # the mmdet-3 port that produced the oracle keeps it local
    }
    return transformer_kwargs, head_kwargs


def image_sizes(metas: list[dict]) -> torch.Tensor:
    return torch.tensor([list(m["img_shape"]) for m in metas], dtype=torch.long)


def targets() -> list[dict[str, torch.Tensor]]:
    inputs = load("tiny_inputs.pth")
    return [{"boxes": b.float(), "labels": l.long()} for b, l in zip(inputs["gt_bboxes"], inputs["gt_labels"])]


def build_detector(cfg: dict | None = None, attention_impl: str = "pytorch"):
    """The codetr detector matching the oracle's mmdet config, with the oracle's weights converted by
    ``codetr.convert`` and loaded strictly. Auxiliary heads are built when their modules exist."""
    from codetr.convert import convert_state_dict
    from codetr.models.backbones.resnet import ResNet
    from codetr.models.co_detr import CoDETR
    from codetr.models.heads.co_dino_head import CoDINOHead
    from codetr.models.necks import ChannelMapper
    from codetr.models.transformer.dino_transformer import DinoTransformer

    cfg = cfg or model_cfg()
    bb, neck = cfg["backbone"], cfg["neck"]
    backbone = ResNet(depth=bb["depth"], base_channels=bb.get("base_channels", 64),
                      frozen_stages=bb.get("frozen_stages", 1), out_indices=tuple(bb.get("out_indices", (0, 1, 2, 3))))
    mapper = ChannelMapper(neck["in_channels"], neck["out_channels"], neck.get("num_outs", 5),
                           neck.get("norm_cfg", {}).get("num_groups", 32), neck.get("kernel_size", 1))
    transformer_kwargs, head_kwargs = query_head_kwargs(cfg)
    transformer = DinoTransformer(**transformer_kwargs, attention_impl=attention_impl)
    query_head = CoDINOHead(transformer=transformer, **head_kwargs)
    aux = aux_heads(cfg)
    detector = CoDETR(backbone, mapper, query_head, **aux)
    state = load("tiny_state_dict.pth")
    converted = convert_state_dict(state, expected={k: v.shape for k, v in detector.state_dict().items()})
    detector.load_state_dict(converted.state_dict, strict=True)
    return detector


def aux_heads(cfg: dict) -> dict:
    """RPN / RoI / ATSS heads from the mmdet config."""
    from aux_oracle import build_atss, build_roi, build_rpn, dense_heads_filter_small_boxes

    filter_small = dense_heads_filter_small_boxes(load("tiny_outputs.pth")["meta"])
    return {"rpn_head": build_rpn(cfg), "roi_head": [build_roi(cfg)], "bbox_head": [build_atss(cfg, filter_small)]}
