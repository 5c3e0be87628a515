"""The Swin backbone choices (swin_t / swin_s / swin_b of the Co-Deformable-DETR recipes, swin_l of Co-DINO): each
composes with the official recipe values (window, pre-training size, drop path by schedule, pretrained file), has
exactly the layout of the timm model of the same name (so timm and official files load), and builds and runs with a
reduced depth."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

# choice -> (timm model, embed dims, window, pre-training size, pretrained file, drop path 1x, drop path 3x)
SWINS = {
    "swin_t": ("swin_tiny_patch4_window7_224", 96, 7, 224, "swin_tiny_patch4_window7_224.pth", 0.2, 0.3),
    "swin_s": ("swin_small_patch4_window7_224", 96, 7, 224, "swin_small_patch4_window7_224.pth", 0.2, 0.4),
    "swin_b": ("swin_base_patch4_window12_384", 128, 12, 384, "swin_base_patch4_window12_384_22k.pth", 0.2, 0.4),
    "swin_l": ("swin_large_patch4_window12_384", 192, 12, 384, "swin_large_patch4_window12_384_22k.pth", 0.3, 0.6),
}


@pytest.mark.parametrize("choice", sorted(SWINS))
def test_swin_choice_composes_with_the_official_recipe_values(compose_cfg, choice):
    from codetr.models.backbones.pretrained import parse_source

    _, dims, window, size, filename, rate_1x, rate_3x = SWINS[choice]
    for epochs, rate in ((12, rate_1x), (36, rate_3x)):
        cfg = OmegaConf.to_container(compose_cfg("train", [f"backbone={choice}", "aug=detr",
                                                           f"trainer.max_epochs={epochs}"]), resolve=True)
        backbone, neck = cfg["model"]["detector"]["backbone"], cfg["model"]["detector"]["neck"]
        assert backbone["_target_"] == "codetr.models.backbones.SwinTransformer"
        assert (backbone["embed_dims"], backbone["window_size"], backbone["pretrain_img_size"]) == (dims, window, size)
        assert backbone["drop_path_rate"] == rate, (choice, epochs)
        assert neck["in_channels"] == [dims, 2 * dims, 4 * dims, 8 * dims]
        assert parse_source(backbone["weights"]).filename == filename


@pytest.mark.parametrize("choice", sorted(SWINS))
def test_swin_choice_has_the_timm_layout_of_its_name(compose_cfg, choice):
    import timm

    cfg = compose_cfg("train", [f"backbone={choice}", "model.detector.backbone.weights=null"])
    with torch.device("meta"):
        ours = instantiate(cfg.model.detector.backbone).state_dict()
        theirs = timm.create_model(SWINS[choice][0], pretrained=False, num_classes=0).state_dict()
    theirs = {k: tuple(v.shape) for k, v in theirs.items() if not k.startswith("norm.")}  # classifier norm
    ours = {k: tuple(v.shape) for k, v in ours.items() if k[:5] not in {"norm0", "norm1", "norm2", "norm3"}}
    assert ours == theirs


@pytest.mark.parametrize("choice", ["swin_t", "swin_s", "swin_b"])
def test_swin_choice_builds_and_runs_with_reduced_depth(compose_cfg, choice):
    cfg = compose_cfg("train", [f"backbone={choice}", "model.detector.backbone.weights=null",
                                "model.detector.backbone.depths=[2,2,1,1]"])
    torch.manual_seed(0)
    backbone = instantiate(cfg.model.detector.backbone).eval()
    dims = SWINS[choice][1]
    assert backbone.out_channels == list(cfg.model.detector.neck.in_channels) == [dims, 2 * dims, 4 * dims, 8 * dims]
    with torch.no_grad():
        outs = backbone(torch.randn(1, 3, 70, 100))
    assert [tuple(o.shape) for o in outs] == [(1, dims * 2**s, -(-70 // 2 ** (s + 2)), -(-100 // 2 ** (s + 2)))
                                              for s in range(4)]
    assert all(torch.isfinite(o).all() for o in outs)
