"""The Co-DINO-Inst recipes compose the original instance configs' mask-branch values, and the full state-dict key
list of the official ViT-L instance models (COCO and LVIS, written by ``tools/oracle/gen_co_dino_inst.py
--full-keys``) converts key by key and shape by shape onto the models the recipes build."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from mask_oracle import load
from omegaconf import OmegaConf

from codetr.convert import ConversionError, convert_state_dict

# recipe: (official key list, K, queries, BAR loss weight, stage sizes, mask channels, mask-IoU fc width)
RECIPES = {
    "co_dino_inst_vit_l_coco": ("vit_l_coco_instance_keys.json", 80, 1500, 1.33 * 12, [14, 28, 56, 112], 256, 1024),
    "co_dino_inst_vit_l_lvis": ("vit_l_lvis_instance_keys.json", 1203, 900, 1.0 * 12, [14, 28, 56, 112], 256, 1024),
}


def compose(recipe: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import codetr.utils  # noqa: F401  (resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_module("codetr.conf", version_base="1.3"):
        cfg = hydra_compose("train", overrides=[f"experiment={recipe}", "model.detector.backbone.weights=null"])
    GlobalHydra.instance().clear()
    return cfg


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_instance_recipe_composes_the_reference_mask_branch(recipe):
    _, classes, queries, loss_weight, sizes, channels, fc = RECIPES[recipe]
    composed = compose(recipe)
    cfg = {k: OmegaConf.to_container(composed[k], resolve=True) for k in ("model", "data", "aug")}
    branch = cfg["model"]["detector"]["mask_branch"]
    assert cfg["data"]["datamodule"]["with_masks"] is True
    assert cfg["model"]["num_queries"] == queries and cfg["data"]["num_classes"] == classes
    assert branch["mask_head"]["stage_sizes"] == sizes and branch["mask_head"]["channels"] == channels
    assert branch["mask_head"]["stage_num_classes"] == [classes] * 3 + [1]
    assert branch["roi_extractor"] == {"_target_": "codetr.models.roi_extractor.MultiLevelRoIExtractor",
                                       "strides": [4, 8, 16, 32, 64], "output_size": sizes[0], "sampling_ratio": 0,
                                       "finest_scale": 56}
    assert abs(branch["loss_weight"] - loss_weight) < 1e-9 and branch["iou_loss_weight"] == 6.0
    assert branch["mask_iou_head"]["fc_channels"] == fc and branch["mask_iou_head"]["roi_size"] == sizes[0]
    assert branch["loss"]["stage_weights"] == [0.5, 0.75, 0.75, 1.0] and branch["loss"]["boundary_width"] == 2
    assert branch["sampler"]["num"] == 512 and branch["sampler"]["pos_fraction"] == 0.25
    assert branch["train_detections"] == cfg["model"]["max_per_image"] == 1000
    assert cfg["model"]["detector"]["pad_size_divisor"] == (32 if cfg["aug"]["name"] == "detr" else 1)


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_official_instance_checkpoint_keys_convert_onto_the_recipe(recipe):
    table = load(RECIPES[recipe][0])
    with torch.device("meta"):
        detector = instantiate(compose(recipe).model.detector)
    shapes = {k: tuple(v.shape) for k, v in detector.state_dict().items()}
    state = {key: torch.zeros(shape, device="meta") for key, shape, _ in table["state_dict"]}
    conversion = convert_state_dict(state, expected=shapes)  # raises naming unmapped / missing / mismatched keys
    assert len(conversion.state_dict) + len(conversion.ignored) == len(state)
    assert {k for k in conversion.state_dict if k.startswith("mask_branch.mask_head.")}
    assert {k for k in conversion.state_dict if k.startswith("mask_branch.mask_iou_head.")}
    assert all(k.startswith("backbone.") and "rope" in k for k in conversion.ignored)
    assert sum(p.numel() for p in detector.parameters()) == table["num_params"]
    state["mask_head.extra_stage.weight"] = torch.zeros(1, device="meta")
    with pytest.raises(ConversionError, match="mask_head.extra_stage"):
        convert_state_dict(state, expected=shapes)
