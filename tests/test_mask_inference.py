"""Instance segmentation through the Python API and the training step: a tiny Co-DINO-Inst (``model=co_dino_inst``)
returns per detection a mask at the original image size (bitmap or RLE) and its mask score; a batch with an image
without ground truth and one whose masks come from RLE trains every parameter; a converted official state dict with
the mask head's keys loads."""

from __future__ import annotations

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from codetr import Detector
from codetr.convert import convert_state_dict
from codetr.inference.description import describe_recipe
from codetr.inference.detector import build_model
from codetr.inference.tta import TTAConfig, fuse_masks, merge_views
from codetr.models.mask_ops import paste_masks
from codetr.predict import predict
from codetr.visualize import PALETTE, draw_detections, draw_masks, mask_outlines

TINY_INST = ["model=co_dino_inst", "model.mask_channels=16", "model.mask_fc_channels=32",
             "model.mask_stage_sizes=[8,16,32,64]", "aug.test_scale=96", "aug.test_max_size=160"]


@pytest.fixture(scope="module")
def tiny_inst():
    torch.manual_seed(0)
    description = describe_recipe("demo", TINY_INST, class_names=["circle", "square", "triangle", "diamond"])
    model = build_model(description)
    with torch.no_grad():  # logits that fill part of the boxes, so that masks are not all empty
        head = model.mask_branch.mask_head.stage_instance_logits[-1]
        head.bias.fill_(0.5)
    return model, description


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_predict_returns_a_mask_per_detection_at_the_original_size_in_bitmap_and_rle(tiny_inst):
    model, description = tiny_inst
    detector = Detector(model, description)
    found = detector.predict(image(90, 120), score_threshold=0.0)
    assert found.masks is not None and found.masks.shape == (len(found), 90, 120) and found.masks.dtype == torch.bool
    assert found.masks.any(), "no mask pixel at all: the test would not see a wrong paste"
    assert found.mask_scores.shape == found.scores.shape and bool((found.mask_scores <= found.scores + 1e-6).all())
    as_rle = detector.predict(image(90, 120), score_threshold=0.0, mask_format="rle")
    assert as_rle.masks is None and len(as_rle.rles) == len(found)
    decoded = np.stack([mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()}) for r in as_rle.rles])
    assert np.array_equal(decoded.astype(bool), found.masks.numpy())
    record = found.to_dict()
    assert len(record["masks"]) == len(found) and record["masks"][0]["size"] == [90, 120]
    kept = detector.predict(image(90, 120), score_threshold=float(found.scores[3]))
    assert len(kept) == 4 and torch.equal(kept.masks, found.masks[:4])


def test_masks_are_the_detectors_probabilities_pasted_at_the_original_boxes(tiny_inst):
    model, description = tiny_inst
    detector = Detector(model, description)
    frame = image(90, 120, seed=3)
    found = detector.predict(frame, score_threshold=0.0)
    raw = detector.detect_view([torch.from_numpy(frame).permute(2, 0, 1)])[0]
    with torch.inference_mode():
        from codetr.inference.inputs import prepare_batch

        batch = prepare_batch([torch.from_numpy(frame).permute(2, 0, 1)], detector._pipeline(1.0), 1)
        from codetr.data.collate import normalize_images

        out = model(normalize_images(batch.images, batch.padding_mask, detector.pixel_mean, detector.pixel_std),
                    batch.image_sizes)[0]
    w_scale, h_scale = batch.scale_factors[0].tolist()
    boxes = out["boxes"] / torch.tensor([w_scale, h_scale, w_scale, h_scale])
    expected = paste_masks(out["mask_probs"], boxes, 90, 120, 0.5)
    assert torch.equal(raw["masks"], expected) and torch.equal(found.masks, expected)
    assert out["mask_probs"].shape[-1] == model.mask_branch.mask_head.stage_sizes[-1]


def test_a_batch_with_an_empty_image_trains_every_parameter(tiny_inst):
    model, _ = tiny_inst
    model.train()
    try:
        images = torch.randn(2, 3, 96, 128)
        sizes = torch.tensor([[96, 128], [80, 112]])
        masks = torch.zeros(2, 96, 128, dtype=torch.bool)
        masks[0, 10:50, 20:70] = True
        rle = mask_utils.encode(np.asfortranarray(np.pad(np.ones((30, 40), np.uint8), ((40, 26), (60, 28)))))
        masks[1] = torch.from_numpy(mask_utils.decode(rle).astype(bool))  # an RLE-decoded mask
        targets = [
            {"boxes": torch.tensor([[20.0, 10.0, 70.0, 50.0], [60.0, 40.0, 100.0, 70.0]]),
             "labels": torch.tensor([1, 2]), "masks": masks},
            {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
             "masks": torch.zeros(0, 80, 112, dtype=torch.bool)},
        ]
        losses = model(images, sizes, targets)
        assert torch.isfinite(losses["loss_mask"]) and torch.isfinite(losses["loss_mask_iou"])
        sum(v for k, v in losses.items() if "loss" in k).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing[:10]
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)


def test_official_mask_keys_convert_onto_the_mask_branch(tiny_inst):
    model, _ = tiny_inst
    ours = model.state_dict()
    official = {}
    for key, value in ours.items():
        if key.startswith("mask_branch.mask_head."):
            official["mask_head." + key[len("mask_branch.mask_head."):]] = value
        elif key.startswith("mask_branch.mask_iou_head."):
            official["mask_iou_head." + key[len("mask_branch.mask_iou_head."):]] = value
    converted = convert_state_dict(official)
    assert set(converted.state_dict) == {k for k in ours if k.startswith("mask_branch.")}
    assert all(torch.equal(converted.state_dict[k], ours[k]) for k in converted.state_dict)


def test_flip_tta_merges_masks_with_their_boxes(tiny_inst):
    model, description = tiny_inst
    detector = Detector(model, description)
    frame = image(90, 120, seed=5)
    plain = detector.predict(frame, score_threshold=0.0)
    merged = detector.predict(frame, score_threshold=0.0, tta=TTAConfig(scales=(1.0,), flip=True))
    assert merged.masks.shape == (len(merged), 90, 120) and merged.mask_scores.shape == merged.scores.shape
    # every merged mask lies within (one pixel of) its fused box: masks moved with their boxes through the flip
    for mask, box in zip(merged.masks, merged.boxes):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(xs):
            assert xs.min() >= box[0].floor() - 1 and xs.max() <= box[2].ceil() + 1
            assert ys.min() >= box[1].floor() - 1 and ys.max() <= box[3].ceil() + 1
    # one view merged with itself: the same boxes, masks and mask scores as without TTA
    view = detector.detect_view([torch.from_numpy(frame).permute(2, 0, 1)])[0]
    same = merge_views([view, view], TTAConfig(flip=False, min_score=0.0, max_per_image=len(plain)))
    order = view["scores"].argsort(descending=True)
    assert torch.equal(same["masks"], view["masks"][order])
    torch.testing.assert_close(same["mask_scores"], view["mask_scores"][order])


def test_mask_fusion_is_a_score_weighted_vote():
    masks = torch.zeros(3, 4, 6, dtype=torch.bool)
    masks[0, :, :3] = True  # strong member: left half
    masks[1, :, 2:] = True  # weak member: right part
    masks[2, 0, 0] = True  # another cluster
    fused = fuse_masks(masks, torch.tensor([0.9, 0.3, 0.5]), torch.tensor([0, 0, 1]), 2)
    assert torch.equal(fused[0], masks[0]) and torch.equal(fused[1], masks[2])
    balanced = fuse_masks(masks[:2], torch.tensor([0.5, 0.5]), torch.tensor([0, 0]), 1)[0]
    assert torch.equal(balanced, masks[0] | masks[1])  # half of the weight is enough


def test_predict_cli_writes_rle_masks_and_draws_them(compose_cfg, tiny_inst, tmp_path):
    model, description = tiny_inst
    path = tmp_path / "inst.ckpt"
    torch.save({"state_dict": {f"detector.{k}": v for k, v in model.state_dict().items()},
                "codetr_model": description.to_dict()}, path)
    Image.fromarray(image(90, 120, seed=7)).save(tmp_path / "a.png")
    cfg = compose_cfg("predict", [f"ckpt_path={path}", f"input={tmp_path / 'a.png'}", "score_threshold=0.0",
                                  f"output_dir={tmp_path / 'out'}", "data.root=/nonexistent"])
    (record,) = predict(cfg)
    assert len(record["masks"]) == len(record["scores"]) == len(record["mask_scores"]) > 0
    decoded = np.stack([mask_utils.decode({"size": r["size"], "counts": r["counts"].encode()})
                        for r in record["masks"]])
    found = Detector(model, description).predict(image(90, 120, seed=7), score_threshold=0.0)
    assert decoded.shape == (len(found), 90, 120) and np.array_equal(decoded.astype(bool), found.masks.numpy())
    drawn = np.asarray(Image.open(tmp_path / "out" / "a.png.png"))
    boxes_only = draw_detections(torch.from_numpy(image(90, 120, seed=7)).permute(2, 0, 1), found.boxes,
                                 found.labels, found.scores, found.names, 0.0)
    assert not np.array_equal(drawn, boxes_only.permute(1, 2, 0).numpy())  # the masks are drawn too


def test_masks_are_drawn_as_a_translucent_fill_with_an_outline():
    picture = torch.zeros(3, 20, 20, dtype=torch.uint8)
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, 5:15, 5:15] = True
    drawn = draw_masks(picture, mask, torch.tensor([1]), alpha=0.5)
    colour = torch.tensor(PALETTE[1], dtype=torch.uint8)
    assert torch.equal(drawn[:, 5, 5], colour) and torch.equal(drawn[:, 14, 10], colour)  # the outline: solid
    assert torch.equal(drawn[:, 10, 10], (colour.float() * 0.5).to(torch.uint8))  # the inside: translucent
    assert torch.equal(drawn[:, 2, 2], torch.zeros(3, dtype=torch.uint8))  # outside: untouched
    assert torch.equal(mask_outlines(mask)[0].sum(), torch.tensor(36))  # the 10 x 10 square's border ring
