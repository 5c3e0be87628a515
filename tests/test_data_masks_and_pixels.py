"""Segmentations pycocotools rejects become box-shaped masks (counted, named) instead of killing training; images
over the pixel limit, float TIFFs and other wide images are handled by rule (files generated here, a few KB)."""

import json
import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from codetr.data import CocoDataModule, CocoDetection
from codetr.data.images import ImageTooLargeError, UnsupportedPixelValuesError, load_rgb
from codetr.data.masks import rle_counts_total

GOOD_POLYGON = [[10, 10, 30, 10, 30, 30, 10, 30]]
BAD_SEGMENTATIONS = {
    "two points": [[1, 1, 10, 10]],
    "empty polygon": [[]],
    "flat list": [10, 10, 30, 10, 30, 30],
    "nan point": [[10, 10, 30, float("nan"), 30, 30]],
    "astronomic point": [[10, 10, 1e12, 10, 30, 30]],
    "rle of another size": {"size": [100, 100], "counts": [0, 10000]},
    "rle too short": {"size": [48, 64], "counts": [0, 10]},
    "rle broken string": {"size": [48, 64], "counts": "garbage!!"},
}


def write_dataset(tmp_path, segmentations):
    Image.new("RGB", (64, 48), (90, 120, 30)).save(tmp_path / "a.png")
    anns = [{"id": 100 + i, "image_id": 1, "category_id": 1, "bbox": [8, 8, 20, 16], "iscrowd": 0,
             "segmentation": segmentation} for i, segmentation in enumerate(segmentations)]
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48}],
                                "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return path


def test_segmentations_pycocotools_rejects_get_box_masks_counted_and_named(tmp_path, caplog):
    path = write_dataset(tmp_path, [GOOD_POLYGON, *BAD_SEGMENTATIONS.values()])
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, path, with_masks=True)
    sample = ds[0]
    masks = sample["masks"].as_subclass(torch.Tensor)
    assert masks.shape == (1 + len(BAD_SEGMENTATIONS), 48, 64) and len(sample["boxes"]) == len(masks)
    assert int(masks[0].sum()) == 400  # the good polygon, decoded
    box_mask = torch.zeros(48, 64, dtype=torch.uint8)
    box_mask[8:24, 8:28] = 1
    assert all(torch.equal(mask, box_mask) for mask in masks[1:])
    assert ds.stats["unusable segmentations replaced by box masks"] == len(BAD_SEGMENTATIONS)
    assert "annotation 101 of a.png (polygon 0 has 4 coordinates" in caplog.text


def test_a_segmentation_that_fits_the_json_but_not_the_decoded_image_is_replaced_at_load_time(tmp_path, caplog):
    rle = mask_utils.encode(np.asfortranarray(np.ones((48, 64), np.uint8)))
    path = write_dataset(tmp_path, [{"size": [48, 64], "counts": rle["counts"].decode()}])
    Image.new("RGB", (60, 40)).save(tmp_path / "a.png")  # the file is smaller than the json says
    with caplog.at_level(logging.WARNING):
        sample = CocoDetection(tmp_path, path, with_masks=True)[0]
    assert sample["masks"].shape == (1, 40, 60)
    assert "a.png: annotation 100: RLE size [48, 64] does not fit the 40 x 60 image" in caplog.text


def test_lsj_and_copy_paste_train_over_bad_segmentations(tmp_path):
    path = write_dataset(tmp_path, [GOOD_POLYGON, *BAD_SEGMENTATIONS.values()])
    aug = {"name": "lsj", "canvas_size": 64, "scale_range": [0.8, 1.2], "copy_paste": True}
    dm = CocoDataModule(str(tmp_path), str(path), aug=aug, batch_size=1, num_workers=0, num_classes=1)
    loader = dm.train_dataloader()
    for epoch in range(4):  # several jitter / paste draws
        loader.sampler.set_epoch(epoch)
        batch = next(iter(loader))
        assert batch.images.shape == (1, 3, 64, 64) and len(batch.targets[0]["boxes"]) > 0


def test_rle_run_lengths_are_read_from_the_compressed_string():
    rng = np.random.default_rng(0)
    for height, width in ((48, 64), (300, 7)):
        mask = np.asfortranarray((rng.random((height, width)) > 0.6).astype(np.uint8))
        assert rle_counts_total(mask_utils.encode(mask)["counts"].decode()) == height * width


def png_header_only(path, width, height):
    """A PNG whose header claims ``width x height`` (no pixel data: only the header is ever read)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IEND", b""))


def test_images_over_the_pixel_limit_are_skipped_and_counted(tmp_path, caplog):
    png_header_only(tmp_path / "bomb.png", 15000, 12000)  # 180 MP, over PIL's own limit too
    with pytest.raises(ImageTooLargeError, match="180000000 pixels is over the limit of 100000000"):
        load_rgb(tmp_path / "bomb.png", max_pixels=100_000_000)
    with pytest.raises(ImageTooLargeError, match="decompression bomb"):  # PIL's DecompressionBombError, renamed
        load_rgb(tmp_path / "bomb.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "ok.png")
    images = [{"id": 1, "file_name": "bomb.png", "width": 15000, "height": 12000},
              {"id": 2, "file_name": "ok.png", "width": 64, "height": 48}]
    (tmp_path / "ann.json").write_text(json.dumps({"images": images, "annotations": [], "categories": [{"id": 1}]}))
    ds = CocoDetection(tmp_path, tmp_path / "ann.json", max_image_pixels=100_000_000)
    with caplog.at_level(logging.WARNING):
        assert ds[0]["image_id"] == 2  # another image drawn in its place
    assert ds.stats["images over the pixel limit skipped"] >= 1 and "bomb.png" in caplog.text


@pytest.mark.parametrize(("values", "expected"), [(np.full((6, 8), 0.5, np.float32), 128),
                                                  (np.full((6, 8), 200.0, np.float32), 200),
                                                  (np.full((6, 8), 30000.0, np.float32), 117)])
def test_float_tiffs_are_converted_by_value_range(tmp_path, values, expected):
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    image = load_rgb(tmp_path / "f.tif")
    assert image.shape == (3, 6, 8) and image.dtype == torch.uint8 and int(image[0, 0, 0]) == expected


def test_float_tiffs_without_a_clear_range_are_refused_by_name(tmp_path):
    values = np.linspace(-1, 1, 48, dtype=np.float32).reshape(6, 8)
    Image.fromarray(values, mode="F").save(tmp_path / "signed.tif")
    with pytest.raises(UnsupportedPixelValuesError, match=r"signed.tif: pixel values range -1..1"):
        load_rgb(tmp_path / "signed.tif")


def test_polygons_reaching_outside_the_image_are_clipped_to_it(tmp_path):
    outside = [[-10, -10, 30, -10, 30, 30, -10, 30]]  # a 40 x 40 square, its top-left quarter outside
    path = write_dataset(tmp_path, [outside])
    sample = CocoDetection(tmp_path, path, with_masks=True)[0]
    mask = sample["masks"].as_subclass(torch.Tensor)[0]
    assert mask.shape == (48, 64)
    ys, xs = torch.nonzero(mask, as_tuple=True)
    assert int(xs.min()) == 0 and int(ys.min()) == 0 and int(xs.max()) == 29 and int(ys.max()) == 29
    assert int(mask.sum()) == 900


def test_thousands_of_instances_with_masks_drop_the_image_from_training_by_name(tmp_path, caplog):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "b.png")
    anns = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [i % 60, i % 40, 3, 3], "iscrowd": 0,
             "segmentation": [[i % 60, i % 40, i % 60 + 3, i % 40, i % 60 + 3, i % 40 + 3]]} for i in range(2500)]
    anns.append({"id": 9999, "image_id": 2, "category_id": 1, "bbox": [8, 8, 20, 16], "iscrowd": 0,
                 "segmentation": GOOD_POLYGON})
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
                                           {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
                                "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, path, with_masks=True, max_boxes_per_image=1000)
    assert [image["file_name"] for image in ds.images] == ["b.png"]
    assert "a.png (2500 boxes)" in caplog.text and "max_boxes_per_image" in caplog.text
    assert ds[0]["masks"].shape == (1, 48, 64)
