"""The synthetic shapes set and the DataModule end to end on it (LSJ + Copy-Paste, DETR aug, predict, evaluator)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from codetr.data import CocoDataModule, DetectionBatch, make_synthetic_coco
from codetr.evaluation import CocoEvaluator

LSJ = {"name": "lsj", "canvas_size": 96, "scale_range": [0.1, 2.0], "pad_value": 114, "min_box_size": 0.01,
       "hflip_prob": 0.5, "copy_paste": True, "copy_paste_max": 100, "copy_paste_box_shift": 10,
       "copy_paste_min_area": 300}
DETR = {"name": "detr", "scales": [96, 112, 128], "max_size": 160, "crop_scales": [80, 96], "crop_max_size": 4200,
        "crop_size": [48, 80], "hflip_prob": 0.5, "test_scale": 112, "test_max_size": 160, "size_divisor": 8}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_synthetic_coco(tmp_path_factory.mktemp("shapes"), num_train=12, num_val=4, image_size=96,
                               num_classes=4, seed=0)


def datamodule(root, aug, **kwargs):
    return CocoDataModule(train_images=str(root / "train"), train_annotations=str(root / "annotations/train.json"),
                          val_images=str(root / "val"), val_annotations=str(root / "annotations/val.json"),
                          aug=aug, batch_size=3, num_workers=0, **kwargs)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside pycocotools
def test_synthetic_annotations_match_the_pixels(root):
    data = json.loads((root / "annotations/train.json").read_text())
    assert {c["id"] for c in data["categories"]} == {1, 2, 3, 4}
    assert len(data["annotations"]) >= 12 and len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    assert {a["category_id"] for a in data["annotations"]} == {1, 2, 3, 4}
    for ann in data["annotations"]:
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 96, 96))
        tight = mask_utils.toBbox(rle)
        np.testing.assert_allclose(tight, ann["bbox"], atol=2.0)  # rasterised polygon vs its extremes
        assert min(ann["bbox"][2:]) >= 0.1 * 96  # objects are not tiny
    first = data["images"][0]
    with Image.open(root / "train" / first["file_name"]) as image:
        assert image.size == (96, 96) and image.mode == "RGB"
        pixels = np.asarray(image, dtype=np.float32)
    # an object is drawn with its class colour: its mask is far from the background's mean colour
    ann = next(a for a in data["annotations"] if a["image_id"] == first["id"])
    mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], 96, 96))).astype(bool)
    assert np.abs(pixels[mask].mean(0) - pixels[~mask].mean(0)).max() > 20


def test_different_seed_gives_different_data(tmp_path):
    a = make_synthetic_coco(tmp_path / "a", 3, 1, 64, 2, seed=0)
    b = make_synthetic_coco(tmp_path / "b", 3, 1, 64, 2, seed=1)
    read = lambda r: json.loads((r / "annotations/train.json").read_text())["annotations"]
    assert read(a) != read(b)
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_coco(tmp_path / "c", 1, 1, 64, 99)


def test_lsj_copy_paste_batches_are_canvas_sized(root):
    torch.manual_seed(0)
    dm = datamodule(root, LSJ)
    dm.setup("fit")
    assert dm.num_classes == 4 and dm.category_ids == [1, 2, 3, 4] and dm.class_names[0] == "circle"
    assert dm.datasets["train"].mix is not None and dm.datasets["train"].with_masks
    batches = list(dm.train_dataloader())
    assert sum(len(b) for b in batches) == 12
    for batch in batches:
        assert isinstance(batch, DetectionBatch) and batch.images.dtype == torch.uint8
        assert batch.images.shape[-2:] == (96, 96)
        assert (batch.image_sizes == 96).all() and not batch.padding_mask.any()
        for target in batch.targets:
            boxes = target["boxes"]
            assert boxes.dtype == torch.float32 and target["labels"].dtype == torch.int64
            assert ((boxes >= 0) & (boxes <= 96)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
            assert ((target["labels"] >= 0) & (target["labels"] < 4)).all()
    val = next(iter(dm.val_dataloader()))
    assert val.images.shape == (1, 3, 96, 96) and (val.image_sizes == 96).all()
    assert torch.allclose(val.scale_factors, torch.ones(1, 2)) and val.image_ids[0] >= 1_000_001


def test_detr_batches_pad_to_divisor_with_content_sizes(root):
    torch.manual_seed(0)
    dm = datamodule(root, DETR)
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape[-2] % 8 == 0 and batch.images.shape[-1] % 8 == 0
    for i, (h, w) in enumerate(batch.image_sizes.tolist()):
        assert min(h, w) in (96, 112, 128) or max(h, w) == 160
        assert not batch.padding_mask[i, :h, :w].any() and batch.padding_mask[i, h:].all()
        assert batch.padding_mask[i, :, w:].all() and (batch.images[i, :, h:] == 0).all()
        assert batch.scale_factors[i].tolist() == pytest.approx([w / 96, h / 96])
    val = next(iter(dm.val_dataloader()))
    assert val.image_sizes.tolist() == [[112, 112]] and val.images.shape[-2:] == (112, 112)
    assert dm.evaluator("val").lvis is False


def test_seeded_shuffling_is_reproducible(root):
    order = []
    for _ in range(2):
        dm = datamodule(root, DETR, seed=3)
        order.append([b.image_ids.tolist() for b in dm.train_dataloader()])
    assert order[0] == order[1]


def test_predict_over_a_folder_and_a_file(root):
    dm = datamodule(root, LSJ, predict_images=str(root / "val"))
    dm.setup("predict")
    assert len(dm.predict_files) == 4
    batch = next(iter(dm.predict_dataloader()))
    assert batch.images.shape[-2:] == (96, 96) and batch.targets[0]["boxes"].shape == (0, 4)
    single = datamodule(root, DETR, predict_images=str(dm.predict_files[0]))
    single.setup("predict")
    assert single.predict_files == dm.predict_files[:1]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        datamodule(root, DETR, predict_images=str(root / "nowhere")).setup("predict")


def test_missing_paths_fail_before_training(root):
    dm = CocoDataModule(train_images=str(root / "missing"), train_annotations=str(root / "annotations/train.json"),
                        aug=DETR, num_workers=0)
    with pytest.raises(FileNotFoundError, match="missing"):
        dm.setup("fit")
    dm = CocoDataModule(train_images=str(root / "train"), train_annotations=str(root / "annotations/nope.json"),
                        aug=DETR, num_workers=0)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        dm.setup("fit")
    with pytest.raises(ValueError, match="unknown augmentation"):
        datamodule(root, {"name": "mosaic"}).setup("fit")


def test_ground_truth_scores_full_ap_through_the_evaluator(root):
    """Ground-truth boxes mapped back from the test pipeline's input frame to the original image give AP = 1."""
    dm = datamodule(root, DETR)
    evaluator = dm.evaluator("val")
    assert isinstance(evaluator, CocoEvaluator)
    dm.setup("validate")
    for batch in dm.val_dataloader():
        detections = []
        for target, scale in zip(batch.targets, batch.scale_factors):
            boxes = target["boxes"] / scale.repeat(2)
            detections.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": target["labels"]})
        evaluator.update(batch.image_ids.tolist(), detections)
    metrics = evaluator.compute()
    assert metrics["AP"] > 0.95 and metrics["AP50"] == pytest.approx(1.0)
