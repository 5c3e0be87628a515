"""Transforms, Copy-Paste and collate against hand-computed examples."""

import torch
from torchvision import tv_tensors

from codetr.data.collate import collate, normalize_images
from codetr.data.copy_paste import CopyPaste
from codetr.data.transforms import (
    CropAtMost,
    DropSmallBoxes,
    JitterCrop,
    KeepRatioResize,
    LongSideJitter,
    PadToCanvas,
    RandomAbsoluteCrop,
    crop_sample,
    detr_test,
    detr_train,
    lsj_test,
    lsj_train,
    masks_to_boxes_safe,
)


def sample(h=40, w=60, boxes=((10.0, 5.0, 30.0, 25.0),), masks=True):
    image = torch.arange(3 * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, h, w)
    b = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    out = {"image": tv_tensors.Image(image), "boxes": tv_tensors.BoundingBoxes(b, format="XYXY", canvas_size=(h, w)),
           "labels": torch.arange(len(b)), "image_id": 7, "orig_size": (h, w)}
    if masks:
        m = torch.zeros(len(b), h, w, dtype=torch.uint8)
        for i, (x1, y1, x2, y2) in enumerate(b.int().tolist()):
            m[i, y1:y2, x1:x2] = 1
        out["masks"] = tv_tensors.Mask(m)
    return out


def test_crop_shifts_clips_and_recomputes_boxes_from_masks():
    s = sample()
    s["masks"][0, 5:25, 10:12] = 0  # the object's left two columns are not part of the mask
    out = crop_sample(s, top=10, left=20, height=20, width=30, recompute_from_masks=True)
    assert out["image"].shape[-2:] == (20, 30)
    assert torch.equal(out["image"], s["image"][:, 10:30, 20:50])
    # mask columns 12..29 -> 20..29 inside the crop -> x 0..10; rows 5..24 -> 10..24 -> y 0..15
    assert out["boxes"].tolist() == [[0.0, 0.0, 10.0, 15.0]]
    plain = crop_sample(s, 10, 20, 20, 30, recompute_from_masks=False)
    assert plain["boxes"].tolist() == [[0.0, 0.0, 10.0, 15.0]]
    gone = crop_sample(s, 30, 40, 10, 20, recompute_from_masks=True)
    assert len(gone["boxes"]) == 0 and len(gone["labels"]) == 0 and gone["masks"].shape[0] == 0


def test_negative_crops_are_kept_but_crops_with_only_empty_masks_are_discarded():
    s = sample(boxes=((10.0, 5.0, 30.0, 25.0),))
    drop = DropSmallBoxes(0.01, discard_if_all_dropped=True)
    # the crop misses the box entirely: removed by the crop, the (negative) sample is kept
    negative = drop(crop_sample(s, 30, 40, 10, 20, recompute_from_masks=True))
    assert len(negative["boxes"]) == 0 and "discard" not in negative
    # the box reaches into the crop but its mask does not: an empty tight box, dropped -> sample discarded
    s["masks"][0, :, 20:30] = 0
    hollow = crop_sample(s, 0, 20, 40, 40, recompute_from_masks=True)
    assert hollow["boxes"].tolist() == [[0.0, 0.0, 0.0, 0.0]]
    assert drop(hollow)["discard"] is True
    # a sample that arrives without boxes is never discarded
    assert "discard" not in drop(negative)


def test_crop_at_most_keeps_small_images_whole():
    out = CropAtMost(100)(sample())
    assert out["image"].shape[-2:] == (40, 60) and out["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]]
    out = CropAtMost(32)(sample())
    assert out["image"].shape[-2:] == (32, 32)


def test_absolute_range_crop_sizes():
    torch.manual_seed(0)
    for _ in range(20):
        out = RandomAbsoluteCrop(20, 30)(sample())
        h, w = out["image"].shape[-2:]
        assert 20 <= h <= 30 and 20 <= w <= 30


def test_pad_to_canvas_bottom_right_with_value():
    out = PadToCanvas(64, fill=114)(sample())
    assert out["image"].shape[-2:] == (64, 64) and out["image_size"] == (64, 64)
    assert (out["image"][:, 40:, :] == 114).all() and (out["image"][:, :, 60:] == 114).all()
    assert out["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]] and out["masks"].shape[-2:] == (64, 64)


def test_lsj_test_fits_long_side_and_pads_with_scale_factor():
    out = lsj_test(canvas_size=120)(sample(h=40, w=60))
    assert out["image"].shape[-2:] == (120, 120) and out["image_size"] == (120, 120)
    assert out["scale_factor"] == (2.0, 2.0)
    assert out["boxes"].tolist() == [[20.0, 10.0, 60.0, 50.0]]
    assert (out["image"][:, 80:, :] == 114).all()


def test_lsj_train_output_is_always_the_canvas():
    torch.manual_seed(0)
    pipeline = lsj_train(canvas_size=64)
    for _ in range(10):
        out = pipeline(sample(h=40, w=60))
        assert out["image"].shape[-2:] == (64, 64) and out["image_size"] == (64, 64)
        boxes = out["boxes"].as_subclass(torch.Tensor)
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes <= 64).all()


def test_detr_test_resize_short_side_with_long_cap():
    out = detr_test(test_scale=80, test_max_size=100)(sample(h=40, w=60))
    # 80 would make the long side 120 > 100: ratio 100/60, height 40 * 5/3 = 66.67 rounds to 67 (reference rounding)
    assert out["image"].shape[-2:] == (67, 100)
    assert out["image_size"] == (67, 100)
    sw, sh = out["scale_factor"]
    assert abs(sw - 100 / 60) < 1e-6 and abs(sh - 67 / 40) < 1e-6


def test_resize_rounds_to_the_nearest_pixel_like_the_reference():
    # 30 x 40 to short side 50: width 40 * 50/30 = 66.67 -> 67 (torchvision's own resize truncates to 66)
    out = KeepRatioResize([50], max_size=1000)(sample(h=30, w=40, boxes=((3.0, 3.0, 12.0, 9.0),)))
    assert out["image"].shape[-2:] == (50, 67) and out["masks"].shape[-2:] == (50, 67)
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[3 * 67 / 40, 5.0, 12 * 67 / 40, 15.0]]))


def test_long_side_jitter_sets_the_long_side_to_s_times_r():
    # r fixed at 0.5, S = 64: 40 x 60 -> ratio 32/60, height 21.33 -> 21, width 32
    out = LongSideJitter((64, 64), scale_range=(0.5, 0.5))(sample(h=40, w=60))
    assert out["image"].shape[-2:] == (21, 32) and out["boxes"].canvas_size == (21, 32)


def test_detr_train_sizes_come_from_the_scale_list_or_the_cap():
    torch.manual_seed(0)
    pipeline = detr_train(scales=(48, 64), max_size=90, crop_scales=(40, 50), crop_size=(20, 30))
    seen = set()
    for _ in range(30):
        out = pipeline(sample(h=40, w=60, boxes=((10.0, 5.0, 30.0, 25.0), (40.0, 20.0, 58.0, 38.0))))
        h, w = out["image"].shape[-2:]
        assert out["image_size"] == (h, w) and "masks" in out
        assert min(h, w) in (48, 64) or max(h, w) == 90
        seen.add((h, w))
        boxes = out["boxes"].as_subclass(torch.Tensor)
        assert len(boxes) == len(out["labels"]) and (boxes[:, 2:] > boxes[:, :2]).all()
        assert (boxes[:, 0::2] <= w).all() and (boxes[:, 1::2] <= h).all()
    # both branches ran: the crop branch gives aspect ratios other than the original 2:3
    assert any(abs(w / h - 1.5) > 0.1 for h, w in seen) and (48, 72) in seen


def test_masks_to_boxes_is_exclusive_on_the_max_side():
    m = torch.zeros(3, 10, 10, dtype=torch.uint8)
    m[0, 2:5, 3:7] = 1
    m[2, 9, 9] = m[2, 0, 4] = 1  # two pieces, touching the last row / column
    assert masks_to_boxes_safe(m).tolist() == [[3.0, 2.0, 7.0, 5.0], [0.0, 0.0, 0.0, 0.0], [4.0, 0.0, 10.0, 10.0]]
    assert masks_to_boxes_safe(m[:0]).shape == (0, 4)


def test_copy_paste_occludes_destination_and_adds_source_objects():
    torch.manual_seed(0)
    dst = sample(h=64, w=64, boxes=((0.0, 0.0, 40.0, 40.0), (50.0, 50.0, 60.0, 60.0)))
    src = sample(h=64, w=64, boxes=((45.0, 45.0, 64.0, 64.0),))
    src["image"] = tv_tensors.Image(torch.full((3, 64, 64), 200, dtype=torch.uint8))
    out = CopyPaste(max_num_pasted=100, box_shift_threshold=10, min_area=300)
    for _ in range(10):  # count ~ U{0, 1}: draw until the object is pasted
        result = out(dst, src)
        if len(result["labels"]) != 2:
            break
    # the small dst object (50..60) is fully covered and dropped; the big one is untouched; src object added
    assert result["boxes"].tolist() == [[0.0, 0.0, 40.0, 40.0], [45.0, 45.0, 64.0, 64.0]]
    assert (result["image"][:, 45:, 45:] == 200).all()
    assert result["masks"].shape[0] == 2


def test_collate_pads_and_normalises_with_zero_padding():
    a, b = sample(h=40, w=60), sample(h=30, w=20)
    batch = collate([a, b], size_divisor=8)
    assert batch.images.shape == (2, 3, 40, 64) and batch.images.dtype == torch.uint8
    assert batch.image_sizes.tolist() == [[40, 60], [30, 20]]
    assert (batch.padding_mask[1, 30:].all() and batch.padding_mask[1, :, 20:].all()
            and not batch.padding_mask[1, :30, :20].any())
    assert batch.targets[0]["boxes"].tolist() == [[10.0, 5.0, 30.0, 25.0]]
    normalized = normalize_images(batch.images, batch.padding_mask, [100.0] * 3, [50.0] * 3)
    assert normalized.dtype == torch.float32 and (normalized[1, :, 30:] == 0).all()
    torch.testing.assert_close(normalized[0, :, 0, 0], (batch.images[0, :, 0, 0].float() - 100) / 50)


def test_jitter_crop_equals_jitter_then_crop():
    """The fused LSJ step gives exactly the two-step result (same seeds), masks included."""
    for seed in range(12):
        s = sample(h=37, w=53, boxes=((3.0, 4.0, 20.0, 30.0), (25.0, 10.0, 50.0, 36.0), (1.0, 1.0, 6.0, 5.0)))
        torch.manual_seed(seed)
        fused = JitterCrop(48, (0.3, 2.0))(s)
        torch.manual_seed(seed)
        two_step = CropAtMost(48)(LongSideJitter((48, 48), scale_range=(0.3, 2.0), antialias=True)(s))
        for key in ("image", "masks", "boxes", "labels"):
            assert torch.equal(fused[key].as_subclass(torch.Tensor), two_step[key].as_subclass(torch.Tensor)), key
        assert fused["boxes"].canvas_size == two_step["boxes"].canvas_size
