"""Eval parity of Co-DINO-Inst with the official Sense-X code (oracle ``CODETR_ORACLE_MASK_DIR``, default the copy in
``tests/data/oracle_co_dino_inst``): the detector is built from the oracle's config (ViT + SFP, Co-DINO query head
with soft-NMS, auxiliary heads, mask branch) and its weights converted by ``codetr.convert``.

* box detections (original-image pixels): boxes within 1e-3 px, scores within 1e-5, labels equal;
* every mask stage's logits: within 1e-4 on the reference's own encoder pyramid; through our own backbone, neck
  and encoder within 1e-4 + 1e-5 x |logit| (the pyramid differs by ~1e-5 and the stages amplify it: logits reach
  ~20 on these random weights);
* the refined final probabilities within 1e-5, the mask scores within 1e-5;
* the pasted binary masks equal the reference's at the original image size, except pixels whose probability is
  within 1e-6 of the threshold (counted); the paste on its own is checked on logits that fill the boxes.
"""

from __future__ import annotations

import pytest
import torch
from mask_oracle import build_detector, image_sizes, load, require_mask_oracle, unpack

from codetr.models.co_detr import image_padding_mask
from codetr.models.mask_ops import paste_masks, refine_stages


@pytest.fixture(scope="module")
def run():
    require_mask_oracle()
    detector = build_detector().eval()
    inputs = load("tiny_inputs.pth")
    images, sizes = inputs["img"].float(), image_sizes()
    with torch.no_grad():
        feats = detector.extract_features(images)
        mask = image_padding_mask(sizes, images.shape[-2:])
        logits, boxes, out = detector.query_head(feats, mask, None)
        pyramid = detector.query_head.encoder_pyramid(out.encoder)
        detections = detector(images, sizes)
    return {"detector": detector, "inputs": inputs, "eval": load("tiny_outputs.pth")["eval"], "logits": logits,
            "boxes": boxes, "pyramid": pyramid, "detections": detections}


def worst(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert bool((diff <= bound).all()), f"max abs error {diff.max():.3g} (bound {atol} + {rtol} x |expected|)"
    return float(diff.max()) if diff.numel() else 0.0


def original_scale(meta: dict) -> torch.Tensor:
    return torch.tensor(meta["scale_factor"], dtype=torch.float32)[:4]


def test_query_head_outputs_and_encoder_pyramid(run):
    ev = run["eval"]
    worst(torch.stack(run["logits"]), ev["all_cls_scores"], 1e-4)
    worst(torch.stack(run["boxes"]), ev["all_bbox_preds"], 1e-4)
    for ours, ref in zip(run["pyramid"], ev["enc_outs"], strict=False):  # the reference adds the downsample level
        worst(ours, ref, 1e-4)


def test_box_detections_match(run):
    for ours, ref, meta in zip(run["detections"], run["eval"]["per_image"], run["inputs"]["img_metas"], strict=True):
        assert len(ours["scores"]) == len(ref["scores"])
        assert torch.equal(ours["labels"], ref["labels"])
        worst(ours["boxes"] / original_scale(meta), ref["bboxes"], 1e-3)
        worst(ours["scores"], ref["scores"], 1e-5)


def _stage_logits(run, pyramid_source: str) -> list[list[torch.Tensor]]:
    branch = run["detector"].mask_branch
    out = []
    with torch.no_grad():
        for image, ref in enumerate(run["eval"]["per_image"]):
            pyramid = run["pyramid"] if pyramid_source == "ours" else run["eval"]["enc_outs"]
            rois = ref["mask_rois"].clone()
            rois[:, 0] = 0  # the reference ran one image at a time
            stages, _, _ = branch.forward_rois([level[image: image + 1] for level in pyramid], rois, ref["labels"])
            out.append(stages)
    return out


@pytest.mark.parametrize(("pyramid", "rtol"), [("reference", 0.0), ("ours", 1e-5)])
def test_every_mask_stage_matches(run, pyramid, rtol):
    errors = []
    for stages, ref in zip(_stage_logits(run, pyramid), run["eval"]["per_image"], strict=True):
        assert len(stages) == len(ref["stage_instance_preds"])
        errors.append(max(worst(s, r, 1e-4, rtol) for s, r in zip(stages, ref["stage_instance_preds"], strict=True)))
    print(f"{pyramid} pyramid: largest mask-stage logit error {max(errors):.3g}")


def test_refinement_probabilities_and_mask_scores_match(run):
    for stages, ours, ref in zip(_stage_logits(run, "reference"), run["detections"], run["eval"]["per_image"],
                                 strict=True):
        worst(refine_stages(stages).squeeze(1).sigmoid(), ref["refined_logits"].squeeze(1).sigmoid(), 1e-5)
        worst(ours["mask_probs"], ref["refined_logits"].squeeze(1).sigmoid(), 1e-5, 1e-5)
        worst(ours["mask_scores"], ref["mask_scores"], 1e-5)


def test_pasted_masks_equal_the_reference(run):
    threshold = run["detector"].mask_branch.mask_threshold
    total = 0
    for ours, ref, meta in zip(run["detections"], run["eval"]["per_image"], run["inputs"]["img_metas"], strict=True):
        height, width = meta["ori_shape"][:2]
        pasted = paste_masks(ours["mask_probs"], ours["boxes"] / original_scale(meta), height, width, threshold)
        reference = unpack(ref["masks"])
        differ = int((pasted != reference).sum())
        near = _near_threshold(ours["mask_probs"], ours["boxes"] / original_scale(meta), height, width, threshold)
        assert bool(((pasted != reference) <= near).all()), "a pasted pixel differs away from the threshold"
        total += differ
    print(f"pasted masks: {total} pixels differ, all within 1e-6 of the threshold")


def test_paste_alone_equals_the_reference_on_filled_boxes(run):
    check = run["eval"]["paste_check"]
    meta = run["inputs"]["img_metas"][0]
    height, width = meta["ori_shape"][:2]
    probs = check["logits"].squeeze(1).sigmoid()
    boxes = check["input_boxes"] / check["scale_factor"]
    pasted = paste_masks(probs, boxes, height, width, run["detector"].mask_branch.mask_threshold)
    reference = unpack(check["masks"])
    assert int(reference.sum()) > 0
    near = _near_threshold(probs, boxes, height, width, run["detector"].mask_branch.mask_threshold)
    assert bool(((pasted != reference) <= near).all())
    print(f"paste: {int(reference.sum())} mask pixels, {int((pasted != reference).sum())} differ (threshold ties)")


def _near_threshold(probs: torch.Tensor, boxes: torch.Tensor, height: int, width: int,
                    threshold: float) -> torch.Tensor:
    """Pixels whose pasted probability lies within 1e-6 of ``threshold``."""
    lower = paste_masks(probs, boxes, height, width, threshold - 1e-6)
    upper = paste_masks(probs, boxes, height, width, threshold + 1e-6)
    return lower & ~upper
