"""Values several parts must agree on are derived by the config and checked when the detector is built: feature
levels (neck outputs, transformer levels, head strides), positive-query branches (``num_co_heads``), the depth of
ViT layer-wise lr decay. A mismatch stops with an error naming both values."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from codetr.lightning.optim import build_optimizer
from codetr.models.backbones.resnet import ResNet
from codetr.models.co_detr import CoDETR
from codetr.models.heads.atss_head import ATSSHead
from codetr.models.heads.co_dino_head import CoDINOHead
from codetr.models.heads.roi_head import RoIHead
from codetr.models.heads.rpn_head import RPNHead
from codetr.models.necks import ChannelMapper
from codetr.models.transformer.dino_transformer import DinoTransformer

DIMS = 32


def parts(num_levels=5, num_outs=5, num_co_heads=2, rpn_strides=(4, 8, 16, 32, 64, 128),
          roi_strides=(4, 8, 16, 32, 64), atss_strides=(4, 8, 16, 32, 64, 128)):
    transformer = DinoTransformer(embed_dims=DIMS, num_heads=2, num_levels=num_levels, num_points=1,
                                  num_encoder_layers=1, num_decoder_layers=1, ffn_dims=32, num_queries=10,
                                  num_co_heads=num_co_heads)
    return {
        "backbone": ResNet(base_channels=8),
        "neck": ChannelMapper([32, 64, 128, 256], DIMS, num_outs, num_groups=8),
        "query_head": CoDINOHead(2, transformer, num_dn_queries=4),
        "rpn_head": RPNHead(in_channels=DIMS, feat_channels=DIMS, strides=rpn_strides),
        "roi_head": [RoIHead(num_classes=2, in_channels=DIMS, fc_channels=16, strides=roi_strides)],
        "bbox_head": [ATSSHead(num_classes=2, in_channels=DIMS, feat_channels=DIMS, num_groups=8,
                               strides=atss_strides)],
    }


def test_agreeing_parts_build():
    CoDETR(**parts())
    CoDETR(**{**parts(num_co_heads=0), "use_positive_queries": False})
    CoDETR(**{**parts(num_co_heads=1), "roi_head": None})


@pytest.mark.parametrize("change, named", [
    ({"num_outs": 6}, ["6 feature levels", "num_levels=5"]),
    ({"num_levels": 4, "num_outs": 4}, ["rpn_head has 6 strides", "= 5 levels"]),
    ({"rpn_strides": (4, 8, 16, 32, 64)}, ["rpn_head has 5 strides", "= 6 levels"]),
    ({"roi_strides": (4, 8, 16, 32)}, ["roi_head[0] has 4 strides", "= 5 levels"]),
    ({"atss_strides": (8, 16, 32, 64, 128, 256)}, ["bbox_head[0] strides [8, 16, 32, 64, 128, 256]",
                                                   "rpn_head strides [4, 8, 16, 32, 64, 128]"]),
    ({"rpn_strides": (4, 8, 16, 32, 64, 64), "atss_strides": (4, 8, 16, 32, 64, 64)}, ["must be 128, not 64"]),
    ({"num_co_heads": 1}, ["num_co_heads=1", "feeds 2 branches"]),
])
def test_disagreeing_parts_name_both_values(change, named):
    with pytest.raises(ValueError) as error:
        CoDETR(**parts(**change))
    for text in named:
        assert text in str(error.value), (text, str(error.value))


def test_positive_query_projections_follow_the_heads_that_feed_them():
    with pytest.raises(ValueError, match=r"num_co_heads=2 .* feeds 0 branches \(use_positive_queries is off\)"):
        CoDETR(**{**parts(num_co_heads=2), "use_positive_queries": False})
    with pytest.raises(ValueError, match=r"num_co_heads=2 .* feeds 1 branches \(0 roi_head \+ 1 bbox_head\)"):
        CoDETR(**{**parts(num_co_heads=2), "roi_head": None})


@pytest.mark.parametrize("overrides, num_co_heads", [
    ([], 2), (["model=dino"], 0), (["model.detector.bbox_head=null"], 1),
    (["model.detector.use_positive_queries=false"], 0),
])
def test_config_derives_levels_and_positive_query_branches(compose_cfg, overrides, num_co_heads):
    cfg = compose_cfg("train", ["experiment=demo", *overrides])
    transformer = OmegaConf.to_container(cfg.model.detector.query_head.transformer, resolve=True)
    assert transformer["num_co_heads"] == num_co_heads
    assert transformer["num_levels"] == cfg.model.detector.neck.num_outs == 5
    cfg = compose_cfg("train", ["experiment=demo", *overrides, "model.detector.neck.num_outs=4"])
    assert cfg.model.detector.query_head.transformer.num_levels == 4


def test_plain_dino_config_builds_without_setting_num_co_heads(compose_cfg):
    from codetr.utils import instantiate_checked

    cfg = compose_cfg("train", ["experiment=demo", "model=dino"])
    detector = instantiate_checked(cfg.model.detector)
    assert len(detector.query_head.transformer.aux_pos_trans) == 0 and detector.rpn_head is None


def vit_like(depth: int) -> torch.nn.Module:
    model = torch.nn.Module()
    model.backbone = torch.nn.Module()
    model.backbone.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(depth)])
    model.head = torch.nn.Linear(2, 2)
    return model


def test_layer_decay_depth_is_the_vit_depth_or_an_error_naming_both():
    optimizer = build_optimizer(vit_like(3), {"lr": 1.0, "weight_decay": 0.0, "layer_decay": 0.5})
    assert sorted(group["lr_scale"] for group in optimizer.param_groups) == [0.125, 0.25, 0.5, 1.0]
    same = build_optimizer(vit_like(3), {"lr": 1.0, "weight_decay": 0.0, "layer_decay": 0.5,
                                         "layer_decay_num_layers": 3})
    assert len(same.param_groups) == 4
    with pytest.raises(ValueError, match=r"layer_decay_num_layers=24 but the ViT backbone has 3 blocks"):
        build_optimizer(vit_like(3), {"lr": 1.0, "weight_decay": 0.0, "layer_decay": 0.5, "layer_decay_num_layers": 24})
    with pytest.raises(ValueError, match=r"layer_decay needs a ViT backbone .* ResNet"):
        model = torch.nn.Module()
        model.backbone = ResNet(base_channels=8)
        build_optimizer(model, {"lr": 1.0, "weight_decay": 0.0, "layer_decay": 0.5})
