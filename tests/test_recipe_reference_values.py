"""Every published recipe composes the values its reference config fixes: activation-checkpointed encoder layers
(``encoder.with_cp``), LSJ canvas (``image_size``, LSJ recipes only), images per GPU (``samples_per_gpu``), backbone
drop path (``drop_path_rate``) and queries (``num_query``).

The table was read from the original Sense-X/Co-DETR configs (``projects/configs/...``, loaded with mmcv's
``Config.fromfile`` so inherited values count); the mmdet-3 ports of the Co-DINO recipes carry the same values.
A recipe whose composition order or ownership of a value goes wrong (a backbone group overriding a model value,
as ``co_deformable_detr_r50_1x`` once got R50's 4 checkpointed Co-DINO layers) fails here.
"""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

# recipe: (reference config, with_cp, LSJ canvas or None, samples_per_gpu, drop path or None, queries)
REFERENCE = {
    "co_dino_r50_lsj_1x": ("co_dino/co_dino_5scale_lsj_r50_1x_coco.py", 4, 1024, 2, None, 900),
    "co_dino_r50_detr_1x": ("co_dino/co_dino_5scale_r50_1x_coco.py", 4, None, 2, None, 900),
    "co_dino_r50_lsj_3x": ("co_dino/co_dino_5scale_lsj_r50_3x_coco.py", 4, 1024, 2, None, 900),
    "co_dino_swin_l_detr_1x": ("co_dino/co_dino_5scale_swin_large_1x_coco.py", 6, None, 1, 0.3, 900),
    "co_dino_swin_l_detr_3x": ("co_dino/co_dino_5scale_swin_large_3x_coco.py", 6, None, 1, 0.6, 900),
    "co_dino_swin_l_lsj_1x": ("co_dino/co_dino_5scale_lsj_swin_large_1x_coco.py", 6, 1280, 1, 0.3, 900),
    "co_dino_swin_l_lsj_3x": ("co_dino/co_dino_5scale_lsj_swin_large_3x_coco.py", 6, 1280, 1, 0.5, 900),
    "co_dino_swin_l_lsj_lvis_3x": ("co_dino/co_dino_5scale_lsj_swin_large_3x_lvis.py", 6, 1280, 1, 0.3, 900),
    "co_dino_swin_l_o365_to_coco_16e": ("co_dino/co_dino_5scale_swin_large_16e_o365tococo.py", 6, None, 1, 0.3, 900),
    "co_dino_swin_l_o365_to_lvis_16e": ("co_dino/co_dino_5scale_lsj_swin_large_16e_o365tolvis.py", 6, 1536, 1, 0.3,
                                        900),
    "co_dino_vit_l_coco": ("co_dino_vit/co_dino_5scale_vit_large_coco.py", 6, None, 1, 0.4, 1500),
    "co_dino_vit_l_lvis": ("co_dino_vit/co_dino_5scale_lsj_vit_large_lvis.py", 6, 1536, 1, 0.3, 900),
    "co_dino_inst_vit_l_coco": ("co_dino_vit/co_dino_5scale_vit_large_coco_instance.py", 6, None, 1, 0.4, 1500),
    "co_dino_inst_vit_l_lvis": ("co_dino_vit/co_dino_5scale_lsj_vit_large_lvis_instance.py", 6, 1536, 1, 0.3, 900),
    "co_deformable_detr_r50_1x": ("co_deformable_detr/co_deformable_detr_r50_1x_coco.py", 0, None, 2, None, 300),
    "co_deformable_detr_swin_t_1x": ("co_deformable_detr/co_deformable_detr_swin_tiny_1x_coco.py", 0, None, 2, 0.2,
                                     300),
    "co_deformable_detr_swin_t_3x": ("co_deformable_detr/co_deformable_detr_swin_tiny_3x_coco.py", 0, None, 2, 0.3,
                                     300),
    "co_deformable_detr_swin_s_1x": ("co_deformable_detr/co_deformable_detr_swin_small_1x_coco.py", 0, None, 2, 0.2,
                                     300),
    "co_deformable_detr_swin_s_3x": ("co_deformable_detr/co_deformable_detr_swin_small_3x_coco.py", 0, None, 2, 0.4,
                                     300),
    "co_deformable_detr_swin_b_1x": ("co_deformable_detr/co_deformable_detr_swin_base_1x_coco.py", 0, None, 2, 0.2,
                                     300),
    "co_deformable_detr_swin_b_3x": ("co_deformable_detr/co_deformable_detr_swin_base_3x_coco.py", 0, None, 2, 0.4,
                                     300),
    "co_deformable_detr_swin_l_1x": ("co_deformable_detr/co_deformable_detr_swin_large_1x_coco.py", 0, None, 2, 0.3,
                                     300),
    "co_deformable_detr_swin_l_900q_3x": ("co_deformable_detr/co_deformable_detr_swin_large_900q_3x_coco.py", 0, None,
                                          2, 0.6, 900),
}


def test_every_published_recipe_has_a_reference_row():
    from test_configs import EXPERIMENTS

    published = {e for e in EXPERIMENTS if not e.startswith(("demo", "co_dab"))}
    missing = published - set(REFERENCE)
    assert not missing, f"recipes without reference values: {sorted(missing)}"


@pytest.mark.parametrize("recipe", sorted(REFERENCE))
def test_recipe_composes_the_reference_values(compose_cfg, recipe):
    source, with_cp, canvas, per_gpu, drop_path, queries = REFERENCE[recipe]
    cfg = OmegaConf.to_container(compose_cfg("train", [f"experiment={recipe}"]), resolve=True)
    model, detector = cfg["model"], cfg["model"]["detector"]
    transformer = detector["query_head"]["transformer"]
    got = {
        "with_cp": transformer["encoder_checkpoint_layers"],
        "canvas": cfg["aug"].get("canvas_size") if cfg["aug"]["name"] == "lsj" else None,
        "samples_per_gpu": cfg["data"]["batch_size"],
        "drop_path": detector["backbone"].get("drop_path_rate"),
        "queries": model["num_queries"],
    }
    expected = {"with_cp": with_cp, "canvas": canvas, "samples_per_gpu": per_gpu, "drop_path": drop_path,
                "queries": queries}
    assert got == expected, f"{recipe} vs {source}"
