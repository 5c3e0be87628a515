"""Export of a tiny Co-DINO-Inst (random weights): the ONNX graph gives per detection the refined mask logits at the
head's resolution and the mask scores; onnxruntime equals the eager inference model, whose mask logits are the mask
branch's own inference path for the same boxes, and the paste-back helper gives the masks the Python API gives."""

from __future__ import annotations

import json

import pytest
import torch
from test_export import assert_same_detections
from test_mask_inference import TINY_INST

from codetr.inference import Detector, describe_recipe
from codetr.inference.detector import build_model
from codetr.inference.export import (
    MASK_OUTPUT_NAMES,
    example_inputs,
    export_program,
    inference_model,
    load_exported,
    paste_exported_masks,
    program_output_names,
    write_program,
)
from codetr.inference.inputs import prepare_batch
from codetr.models.roi_extractor import rois_from_boxes

onnxruntime = pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def tiny_inst_export():
    torch.manual_seed(0)
    description = describe_recipe("demo", TINY_INST)
    model = build_model(description)
    with torch.no_grad():  # masks that fill part of the boxes
        model.mask_branch.mask_head.stage_instance_logits[-1].bias.fill_(0.5)
    model.mask_branch.test_chunk = 160  # two chunks over the 300 detections
    detector = Detector(model, description)
    exported = inference_model(detector)
    return detector, exported, export_program(exported)


def test_onnxruntime_mask_outputs_equal_eager(tiny_inst_export, tmp_path):
    detector, model, program = tiny_inst_export
    assert program_output_names(program) == MASK_OUTPUT_NAMES
    run = load_exported(write_program(program, tmp_path / "inst.onnx", "onnx",
                                      json.dumps(detector.description.to_dict())))
    for size in [(1, 128, 160), (2, 200, 136)]:
        inputs = example_inputs(*size)
        with torch.inference_mode():
            expected = model(*inputs)
        got = run(*inputs)
        assert len(got) == 5 and got[3].shape == (size[0], expected[0].shape[1], 64, 64)
        assert_same_detections(expected[:3], got[:3])
        # rows match one to one where the boxes do (no near-tied score swapped them)
        same = (expected[0] - got[0]).abs().amax(-1) <= 1e-3
        assert float(same.float().mean()) > 0.9
        torch.testing.assert_close(got[3][same], expected[3][same], atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got[4][same], expected[4][same], atol=1e-4, rtol=0)


def test_exported_mask_logits_are_the_branchs_inference_and_paste_like_the_api(tiny_inst_export):
    detector, model, _ = tiny_inst_export
    frame = torch.randint(0, 256, (3, 90, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(4))
    batch = prepare_batch([frame], detector._pipeline(1.0), detector.size_divisor)
    with torch.inference_mode():
        boxes, scores, labels, mask_logits, mask_scores = model(batch.images, batch.image_sizes)
        # the eager mask branch on the same boxes (its predict path, chunked per image)
        padding = torch.zeros(batch.images.shape[0], *batch.images.shape[-2:], dtype=torch.bool)
        for i, (h, w) in enumerate(batch.image_sizes.tolist()):
            padding[i, h:, :] = True
            padding[i, :, w:] = True
        from codetr.data.collate import normalize_images

        normalized = normalize_images(batch.images, padding, model.pixel_mean, model.pixel_std)
        _, _, out = model.query_head(list(model.neck(model.backbone(normalized))), padding, None)
        pyramid = model.query_head.encoder_pyramid(out.encoder)
        eager = model.mask_branch.predict(pyramid, [{"boxes": boxes[0], "scores": scores[0], "labels": labels[0]}])[0]
    torch.testing.assert_close(mask_logits[0].sigmoid(), eager["mask_probs"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mask_scores[0], eager["mask_scores"], atol=1e-6, rtol=0)
    assert len(rois_from_boxes([boxes[0]])) == boxes.shape[1]
    pasted = paste_exported_masks(mask_logits[0], boxes[0], tuple(batch.scale_factors[0].tolist()), (90, 120),
                                  detector.mask_threshold)
    assert pasted.shape == (boxes.shape[1], 90, 120) and pasted.any()
    # the API's masks for the same detections: every row of the API is a row of the export (same boxes)
    api = detector.detect_view([frame])[0]
    scale = batch.scale_factors[0].repeat(2)
    for box, mask in zip(api["boxes"][:20], api["masks"][:20]):
        row = int(((boxes[0] / scale - box).abs().amax(-1)).argmin())
        assert float((boxes[0, row] / scale - box).abs().max()) < 1e-3
        assert torch.equal(pasted[row], mask)
