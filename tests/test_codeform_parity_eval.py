"""Eval parity of Co-Deformable-DETR with the official Sense-X code (oracle ``CODETR_ORACLE_CODEFORM_DIR``): the model
is built from the oracle's config, its weights converted by ``codetr.convert``; every recorded intermediate and
decoder layer within 1e-4 absolute, the final detections (top 100, original-image pixels) within 1e-3 px and
scores within 1e-5."""

from __future__ import annotations

import pytest
import torch
from codeform_oracle import build_detector, image_sizes, load, require_codeform

from codetr.models.co_detr import image_padding_mask

ATOL = 1e-4


@pytest.fixture(scope="module")
def run():
    require_codeform()
    detector = build_detector().eval()
    transformer = detector.query_head.transformer
    record: dict = {"encoder": [], "decoder": [], "decoder_in": []}
    hooks = [layer.register_forward_hook(lambda m, i, o: record["encoder"].append(o))
             for layer in transformer.encoder.layers]
    for layer in transformer.decoder.layers:
        hooks.append(layer.register_forward_hook(lambda m, i, o: record["decoder"].append(o)))
        hooks.append(layer.register_forward_pre_hook(lambda m, args: record["decoder_in"].append(args[:3])))
    images, sizes = load("tiny_inputs.pth")["img"].float(), image_sizes()
    with torch.no_grad():
        record["backbone"] = detector.backbone(images)
        feats = detector.neck(record["backbone"])
        record["neck"] = feats
        mask = image_padding_mask(sizes, images.shape[-2:])
        record["masks"], record["pos"] = detector.query_head.level_masks(feats, mask)
        logits, boxes, out = detector.query_head(feats, mask)
        record["output_memory"], record["proposals"] = transformer.encoder_proposals(out.encoder)
        record["pyramid"] = detector.query_head.aux_pyramid(out.encoder)
        for hook in hooks:
            hook.remove()
        detections = detector(images, sizes)
    return {"record": record, "detector": detector, "logits": logits, "boxes": boxes, "out": out,
            "detections": detections, "inter": load("tiny_intermediates.pth"), "eval": load("tiny_outputs.pth")["eval"]}


def close(actual, expected, atol=ATOL) -> float:
    expected = expected.to(actual.dtype)
    finite = torch.isfinite(expected)
    assert actual.shape == expected.shape
    assert torch.equal(torch.isfinite(actual), finite), "inf/nan pattern differs"
    error = (actual[finite] - expected[finite]).abs().max().item() if finite.any() else 0.0
    assert error <= atol, f"max abs error {error:.3g} > {atol}"
    return error


def test_backbone_neck_masks_and_positional_encodings(run):
    record, inter = run["record"], run["inter"]
    for ours, ref in zip(record["backbone"], inter["backbone.out"], strict=True):
        close(ours, ref)
    for ours, ref in zip(record["neck"], inter["neck.out"], strict=True):
        close(ours, ref)
    for ours, ref in zip(record["masks"], inter["query_head.mlvl_masks"], strict=True):
        assert torch.equal(ours, ref)
    for ours, ref in zip(record["pos"], inter["query_head.mlvl_pos_embeds"], strict=True):
        close(ours, ref)
    state = run["out"].encoder
    close(state.valid_ratios, inter["encoder.in.valid_ratios"])
    assert torch.equal(state.padding_mask, inter["encoder.in.key_padding_mask"])


def test_encoder_layers_memory_and_proposals(run):
    record, inter, outputs = run["record"], run["inter"], run["eval"]
    for k, ours in enumerate(record["encoder"]):
        close(ours, inter[f"encoder.layers.{k}.out"])
    close(run["out"].encoder.memory, outputs["memory"])
    close(record["output_memory"], inter["transformer.output_memory"])
    close(record["proposals"], inter["transformer.output_proposals"])


def test_query_selection_on_the_first_class_logit(run):
    out, outputs, inter = run["out"], run["eval"], run["inter"]
    close(out.enc_logits, outputs["enc_outputs_class"])
    close(out.enc_boxes, outputs["enc_outputs_coord"])
    assert torch.equal(out.enc_topk_indices, outputs["enc_topk_indices"])
    close(out.enc_topk_logits, outputs["enc_topk_score"])
    close(out.enc_topk_boxes, outputs["enc_topk_anchor"])
    close(out.references[0], inter["decoder.in.reference_points"])


def test_every_decoder_layer_keeps_the_query_position(run):
    record, inter, outputs = run["record"], run["inter"], run["eval"]
    num_layers = len(record["decoder"])
    assert num_layers == len(inter["decoder.out.inter_states"])
    for k in range(num_layers):
        tgt, query_pos, reference_input = record["decoder_in"][k]
        if k == 0:
            close(tgt, inter["decoder.in.query"])
        close(query_pos, inter["decoder.in.query_pos"])
        close(reference_input, inter[f"decoder.layers.{k}.in.reference_points_input"])
        close(record["decoder"][k], inter[f"decoder.layers.{k}.out"])
    close(torch.stack(run["out"].hidden), inter["decoder.out.inter_states"])
    close(torch.stack(run["out"].references[1:]), inter["decoder.out.inter_references"])
    close(torch.stack(run["logits"]), outputs["all_cls_scores"])
    close(torch.stack(run["boxes"]), outputs["all_bbox_preds"])


def test_auxiliary_pyramid(run):
    for ours, ref in zip(run["record"]["pyramid"], run["eval"]["enc_outs"], strict=True):
        close(ours, ref)
    close(run["record"]["pyramid"][-1], run["inter"]["query_head.enc_feature_map_level4_downsample"])


def test_final_detections_in_original_image_pixels(run):
    """Top 100 without NMS; boxes divided by the scale factor like the reference's ``rescale=True``."""
    worst_box = worst_score = 0.0
    metas = load("tiny_inputs.pth")["img_metas"]
    for ours, ref, meta in zip(run["detections"], run["eval"]["detections"], metas, strict=True):
        scale = torch.tensor(meta["scale_factor"], dtype=torch.float32)[:4]
        assert len(ours["scores"]) == len(ref["scores"])
        assert torch.equal(ours["labels"], ref["labels"])
        worst_box = max(worst_box, close(ours["boxes"] / scale, ref["bboxes"], atol=1e-3))
        worst_score = max(worst_score, close(ours["scores"], ref["scores"], atol=1e-5))
    print(f"largest detection errors: boxes {worst_box:.3g} px, scores {worst_score:.3g}")


@pytest.mark.parametrize("mode", ["one_stage", "two_stage"])
def test_auxiliary_eval_paths(run, mode):
    """``eval_module='one-stage'`` (ATSS, NMS 0.6) / ``'two-stage'`` (RPN + RoI head, NMS 0.5): the detector's own
    forward with ``eval_module`` set gives the reference's detections (every kept box, zero-width ones clipped at
    the border included)."""
    detector = run["detector"]
    images, sizes = load("tiny_inputs.pth")["img"].float(), image_sizes()
    detector.eval_module = mode.replace("_", "-")
    try:
        with torch.no_grad():
            results = detector(images, sizes)
    finally:
        detector.eval_module = "detr"
    metas = load("tiny_inputs.pth")["img_metas"]
    for ours, ref, meta in zip(results, run["eval"][f"detections_{mode}"], metas, strict=True):
        scale = torch.tensor(meta["scale_factor"], dtype=torch.float32)[:4]
        assert ours["boxes"].shape == ref["bboxes"].shape
        assert torch.equal(ours["labels"], ref["labels"])
        close(ours["boxes"] / scale, ref["bboxes"], atol=1e-3)
        close(ours["scores"], ref["scores"], atol=1e-5)


def test_eval_module_names_are_checked(run):
    with pytest.raises(ValueError, match="eval_module must be one of"):
        run["detector"].eval_module = "rpn"
