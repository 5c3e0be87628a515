"""Conversion of official Co-DINO-style key names for Co-Deformable-DETR: the full R50 key list of the official
``co_deformable_detr_r50_1x_coco`` (Co-Deformable-DETR oracle, ``CODETR_ORACLE_CODEFORM_DIR``) maps key by key
and shape by shape onto the model that ``model=co_deformable_detr backbone=r50`` builds; unknown keys are
reported by name."""

from __future__ import annotations

import pytest
import torch
from codeform_oracle import load
from hydra.utils import instantiate
from test_convert import _expected_rename

from codetr.convert import ConversionError, convert_state_dict


def _reference_state() -> dict[str, torch.Tensor]:
    table = load("r50_state_dict_keys.json")["state_dict"]
    return {key: torch.zeros(shape, device="meta") for key, shape, _ in table}


@pytest.fixture(scope="module")
def r50_shapes():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import codetr.utils  # noqa: F401  (resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_module("codetr.conf", version_base="1.3"):
        cfg = compose("train", overrides=["model=co_deformable_detr", "backbone=r50", "data=coco",
                                            "model.detector.backbone.weights=null"])
    GlobalHydra.instance().clear()
    detector = instantiate(cfg.model.detector)
    params = sum(p.numel() for p in detector.parameters())
    return {k: tuple(v.shape) for k, v in detector.state_dict().items()}, params


def test_every_r50_key_maps_onto_the_composed_model(r50_shapes):
    shapes, num_params = r50_shapes
    state = _reference_state()
    conversion = convert_state_dict(state, expected=shapes)  # raises on unmapped / missing / mismatched keys
    assert len(conversion.state_dict) == len(state) == len(shapes)
    for key in state:
        assert _expected_rename(key) in conversion.state_dict, key
    assert num_params == load("r50_state_dict_keys.json")["num_params"]


def test_unknown_and_missing_keys_are_reported_by_name(r50_shapes):
    shapes, _ = r50_shapes
    state = _reference_state()
    state["query_head.transformer.pos_trans_extra.weight"] = torch.zeros(4, device="meta")
    with pytest.raises(ConversionError, match="pos_trans_extra"):
        convert_state_dict(state, expected=shapes)
    state = _reference_state()
    del state["query_head.transformer.head_pos_embed.weight"]
    with pytest.raises(ConversionError, match="head_pos_embed"):
        convert_state_dict(state, expected=shapes)


def test_cli_converted_checkpoint_gives_the_reference_detections(tmp_path):
    """``python -m codetr.convert`` on the official tiny checkpoint (wrapped as mmdet saves it), loaded into the
    detector built from the oracle config with ``load_detector_weights``: the reference's final detections."""
    from codeform_oracle import build_detector, image_sizes

    from codetr.checkpoint_io import load_detector_weights
    from codetr.convert import main

    src, dst = tmp_path / "official.pth", tmp_path / "codetr.ckpt"
    torch.save({"state_dict": dict(load("tiny_state_dict.pth")), "meta": {"epoch": 12}}, src)
    assert main([str(src), str(dst)]) == 0
    checkpoint = torch.load(dst, weights_only=True)
    detector = build_detector()
    for parameter in detector.parameters():
        torch.nn.init.zeros_(parameter)
    state = {k.removeprefix("detector."): v for k, v in checkpoint["state_dict"].items()}
    assert load_detector_weights(detector, state) == []
    with torch.no_grad():
        detections = detector.eval()(load("tiny_inputs.pth")["img"].float(), image_sizes())
    for ours, ref, meta in zip(detections, load("tiny_outputs.pth")["eval"]["detections"],
                               load("tiny_inputs.pth")["img_metas"], strict=True):
        scale = torch.tensor(meta["scale_factor"], dtype=torch.float32)[:4]
        assert torch.equal(ours["labels"], ref["labels"])
        torch.testing.assert_close(ours["boxes"] / scale, ref["bboxes"], rtol=0, atol=1e-3)
        torch.testing.assert_close(ours["scores"], ref["scores"], rtol=0, atol=1e-5)


def test_swin_recipe_has_the_official_layout_beyond_the_backbone():
    """``experiment=co_deformable_detr_swin_t_1x`` (reduced depth) builds every non-backbone key of the official
    R50 checkpoint with its shape, except the neck's input convs, which read Swin-T stages 1-3 (192 / 384 / 768
    channels), and converts key by key; the backbone has output norms norm1-3 only, as the official Swin checkpoints
    (out_indices 1-3)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import codetr.utils  # noqa: F401  (resolvers)

    GlobalHydra.instance().clear()
    with initialize_config_module("codetr.conf", version_base="1.3"):
        overrides = ["experiment=co_deformable_detr_swin_t_1x", "model.detector.backbone.weights=null",
                     "model.detector.backbone.depths=[2,2,1,1]"]
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    ours = {k: tuple(v.shape) for k, v in instantiate(cfg.model.detector).state_dict().items()}
    official = {key: shape for key, shape, _ in load("r50_state_dict_keys.json")["state_dict"]
                if not key.startswith("backbone.")}
    for i, channels in enumerate((192, 384, 768)):
        official[f"neck.convs.{i}.conv.weight"] = (256, channels, 1, 1)
    official["neck.extra_convs.0.conv.weight"] = (256, 768, 3, 3)
    state = {key: torch.zeros(shape, device="meta") for key, shape in official.items()}
    expected = {k: v for k, v in ours.items() if not k.startswith("backbone.")}
    conversion = convert_state_dict(state, expected=expected)  # raises on unmapped / missing / mismatched keys
    assert len(conversion.state_dict) == len(official) == len(expected)
    assert sorted(k for k in ours if k.startswith("backbone.norm")) == [f"backbone.norm{s}.{p}" for s in (1, 2, 3)
                                                                         for p in ("bias", "weight")]
