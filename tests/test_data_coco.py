"""COCO-format dataset: category mapping, sanitising and every bad-input case (files generated here)."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.data import CocoDataModule, CocoDetection, make_synthetic_coco


def write_image(path, size=(64, 48), mode="RGB", value=128):
    if mode == "I;16":
        Image.fromarray(np.full(size[::-1], 40000, dtype=np.uint16)).save(path)
    else:
        Image.new(mode, size, value if mode in ("L", "I") else (value,) * len(mode)).save(path)


def coco(tmp_path, images, annotations, categories=({"id": 5, "name": "a"}, {"id": 9, "name": "b"})):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": list(categories)}))
    return ann


def test_category_ids_map_to_contiguous_labels_and_boxes_are_xyxy(tmp_path):
    write_image(tmp_path / "a.png")
    ann = coco(tmp_path, [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
               [{"id": 1, "image_id": 1, "category_id": 9, "bbox": [4, 6, 10, 20], "iscrowd": 0}])
    ds = CocoDetection(tmp_path, ann)
    s = ds[0]
    assert ds.category_ids == [5, 9] and ds.class_names == ["a", "b"]
    assert s["labels"].tolist() == [1] and s["boxes"].tolist() == [[4.0, 6.0, 14.0, 26.0]]
    assert s["image"].shape == (3, 48, 64) and s["orig_size"] == (48, 64) and s["image_id"] == 1


def test_bad_annotations_are_dropped_clipped_and_counted(tmp_path, caplog):
    write_image(tmp_path / "a.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [0, 0, 0, 10]},  # zero width
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [0, 0, -3, 10]},  # negative
        {"id": 3, "image_id": 1, "category_id": 5, "bbox": [float("nan"), 0, 3, 10]},
        {"id": 4, "image_id": 1, "category_id": 77, "bbox": [0, 0, 3, 10]},  # unknown category
        {"id": 5, "image_id": 1, "category_id": 5, "bbox": [0, 0, 3, 10], "iscrowd": 1},
        {"id": 6, "image_id": 1, "category_id": 5, "bbox": [50, 40, 30, 30]},  # partly outside -> clipped
        {"id": 7, "image_id": 1, "category_id": 5, "bbox": [100, 100, 5, 5]},  # > an image side outside -> dropped
        {"id": 8, "image_id": 1, "category_id": 5, "bbox": [64, 10, 5, 5]},  # right of the image -> dropped at load
    ]
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
                               "annotations": anns, "categories": [{"id": 5, "name": "a"}]}).replace("NaN", "null"))
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, ann)
    s = ds[0]
    assert s["boxes"].tolist() == [[50.0, 40.0, 64.0, 48.0]]
    assert ds.stats["annotations with zero or negative size dropped"] == 2
    assert ds.stats["annotations with unknown category ids dropped"] == 1
    assert ds.stats["annotations with missing or non-finite boxes dropped"] == 1
    assert ds.stats["crowd annotations (evaluation only)"] == 1
    assert ds.stats["boxes far outside their image dropped (more than a whole image side)"] == 1
    assert ds.stats["boxes reaching outside their image clipped"] == 2  # 6 and 8 (named in the warning)
    assert ds.stats["boxes outside the image dropped"] == 1
    assert "unknown category" in caplog.text


def test_odd_image_files_load_as_rgb(tmp_path):
    modes = {"gray.png": "L", "rgba.png": "RGBA", "deep.png": "I;16", "pal.png": "P"}
    images = []
    for i, (name, mode) in enumerate(modes.items()):
        write_image(tmp_path / name, mode=mode)
        images.append({"id": i + 1, "file_name": name, "width": 64, "height": 48})
    ds = CocoDetection(tmp_path, coco(tmp_path, images, []))
    for i in range(len(ds)):
        assert ds[i]["image"].shape == (3, 48, 64) and ds[i]["image"].dtype == torch.uint8
    assert ds[2]["image"].max() > 100  # 16-bit scaled, not clipped to 255 garbage


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (64, 32), (10, 20, 30))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    image.save(tmp_path / "r.jpg", exif=exif)
    ds = CocoDetection(tmp_path, coco(tmp_path, [{"id": 1, "file_name": "r.jpg", "width": 32, "height": 64}], []))
    assert ds[0]["image"].shape == (3, 64, 32)


def test_unreadable_images_are_skipped_with_a_counted_warning(tmp_path, caplog):
    write_image(tmp_path / "good.png")
    (tmp_path / "text.png").write_text("not an image")
    data = (tmp_path / "good.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    images = [
        {"id": i, "file_name": n, "width": 64, "height": 48} for i, n in enumerate(["text.png", "cut.png", "good.png"])
    ]
    ds = CocoDetection(tmp_path, coco(tmp_path, images, []))
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            assert ds[i]["image"].shape == (3, 48, 64)
    assert ds.stats["unreadable images skipped"] >= 2
    assert caplog.text.count("cannot read") == 1


def test_duplicate_ids_small_images_and_empty_images(tmp_path):
    write_image(tmp_path / "a.png")
    write_image(tmp_path / "tiny.png", size=(10, 10))
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "tiny.png", "width": 10, "height": 10}]
    ds = CocoDetection(tmp_path, coco(tmp_path, images, []))
    assert len(ds) == 1 and len(ds[0]["boxes"]) == 0
    assert ds.stats["duplicate image ids dropped"] == 1


def test_clear_errors_before_training(tmp_path):
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        CocoDetection(tmp_path / "missing", tmp_path / "ann.json")
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CocoDetection(tmp_path, tmp_path / "ann.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="missing field 'categories'"):
        CocoDetection(tmp_path, bad)
    with pytest.raises(ValueError, match="empty dataset"):
        CocoDetection(tmp_path, coco(tmp_path, [], []))
    dm = CocoDataModule(str(tmp_path / "nope"), str(bad), aug={"name": "detr"})
    with pytest.raises(FileNotFoundError, match="train image folder not found"):
        dm.setup("fit")


def test_lvis_images_are_found_from_coco_url(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "val2017").mkdir()
    write_image(tmp_path / "train2017" / "000000000001.jpg")
    images = [{"id": 1, "coco_url": "http://images.cocodataset.org/train2017/000000000001.jpg", "width": 64,
               "height": 48, "not_exhaustive_category_ids": [], "neg_category_ids": []}]
    ds = CocoDetection(tmp_path / "val2017", coco(tmp_path, images, []))
    assert ds[0]["image"].shape == (3, 48, 64)


def test_synthetic_dataset_is_deterministic_and_reused(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", 4, 2, 96, 3, seed=1)
    b = make_synthetic_coco(tmp_path / "b", 4, 2, 96, 3, seed=1)
    ja, jb = (json.loads((p / "annotations" / "train.json").read_text()) for p in (a, b))
    assert ja["annotations"] == jb["annotations"] and len(ja["categories"]) == 3
    stamp = (a / "annotations" / "train.json").stat().st_mtime_ns
    make_synthetic_coco(tmp_path / "a", 4, 2, 96, 3, seed=1)
    assert (a / "annotations" / "train.json").stat().st_mtime_ns == stamp
    ds = CocoDetection(a / "train", a / "annotations" / "train.json", with_masks=True)
    s = ds[0]
    assert s["masks"].shape[0] == len(s["boxes"]) > 0


def test_discarded_samples_are_redrawn_and_the_mix_partner_is_always_usable(tmp_path):
    for name in ("a.png", "b.png"):
        write_image(tmp_path / name)
    images = [{"id": i, "file_name": n, "width": 64, "height": 48} for i, n in ((1, "a.png"), (2, "b.png"))]
    anns = [{"id": i, "image_id": i, "category_id": 5, "bbox": [4, 4, 20, 20], "iscrowd": 0} for i in (1, 2)]

    def transform(sample):  # the pipeline discards image 1 (as FilterAnnotations would after a bad crop)
        return {**sample, "discard": True} if sample["image_id"] == 1 else sample

    partners = []
    ds = CocoDetection(tmp_path, coco(tmp_path, images, anns), transform=transform,
                       mix=lambda dst, src: partners.append(src["image_id"]) or dst)
    for _ in range(5):
        out = ds[0]
        assert out["image_id"] == 2 and "discard" not in out
    assert partners == [2] * 5
    assert ds.stats["augmented samples that lost all boxes redrawn"] >= 5
