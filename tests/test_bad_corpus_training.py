"""Training runs over a corpus full of bad input finish: extreme shapes (1x1, 10000x40), unreadable files, odd
image modes, EXIF rotation, sizes that disagree with the json, degenerate / NaN / outside / crowd boxes, unknown
categories, duplicated ids, images without annotations -- on one process and on two DDP processes (gloo, the
resumable sampler splitting an odd number of usable images, batches without usable ground truth on a rank).
The 10000x40 image also covers inputs with fewer encoder tokens than decoder queries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from codetr.data import make_synthetic_coco
from codetr.train import train

TINY = [
    "experiment=demo", "data=custom", "data.num_classes=4", "data.batch_size=2", "data.datamodule.val_batch_size=2",
    "aug.scales=[64]", "aug.crop_scales=[64]", "aug.crop_size=[48,64]", "aug.test_scale=64", "callbacks=none",
    "trainer.max_epochs=1", "logger=csv",
]


def add_image(root: Path, data: dict, name: str, size: tuple[int, int], boxes: list, mode: str = "RGB",
              json_size: tuple[int, int] | None = None, image_id: int | None = None, exif_rotate: bool = False):
    path = root / "train" / name
    image = Image.new(mode, size, 128 if mode in ("L", "I;16", "P") else (200, 60, 40)[: len(mode)])
    if mode == "I;16":
        image = Image.new("I;16", size)
    kwargs = {}
    if exif_rotate:
        exif = image.getexif()
        exif[0x0112] = 6
        kwargs["exif"] = exif
    image.save(path, **kwargs)
    image_id = image_id if image_id is not None else max(i["id"] for i in data["images"]) + 1
    width, height = json_size or size
    data["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})
    for box, category in boxes:
        data["annotations"].append({"id": len(data["annotations"]) + 1000, "image_id": image_id,
                                    "category_id": category, "bbox": box, "area": 1.0, "iscrowd": 0})
    return image_id


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = make_synthetic_coco(tmp_path_factory.mktemp("corpus"), num_train=5, num_val=2, image_size=64,
                               num_classes=4, seed=1)
    annotations = root / "annotations" / "train.json"
    data = json.loads(annotations.read_text())
    category = data["categories"][0]["id"]
    add_image(root, data, "one_pixel.png", (1, 1), [([0, 0, 1, 1], category)])
    add_image(root, data, "very_wide.png", (10000, 40), [([100, 5, 2000, 30], category), ([9000, 0, 999, 40],
                                                                                         category)])
    add_image(root, data, "very_tall.png", (40, 3000), [([5, 100, 30, 800], category)])
    add_image(root, data, "gray.png", (64, 48), [([4, 4, 20, 20], category)], mode="L")
    add_image(root, data, "rgba.png", (64, 48), [([4, 4, 20, 20], category)], mode="RGBA")
    add_image(root, data, "deep.png", (64, 48), [([4, 4, 20, 20], category)], mode="I;16")
    add_image(root, data, "rotated.jpg", (64, 40), [([2, 2, 30, 20], category)], exif_rotate=True,
              json_size=(40, 64))
    add_image(root, data, "wrong_size.png", (64, 48), [([40, 30, 40, 40], category)], json_size=(128, 96))
    add_image(root, data, "bad_boxes.png", (64, 48), [([0, 0, 0, 5], category), ([1, 1, -4, 5], category),
                                                     ([None, 0, 3, 3], category), ([500, 500, 5, 5], category),
                                                     ([2, 2, 10, 10], 999)])
    crowd = add_image(root, data, "crowd_only.png", (64, 48), [([4, 4, 30, 30], category)])
    data["annotations"][-1]["iscrowd"] = 1
    add_image(root, data, "no_annotations.png", (64, 48), [])
    add_image(root, data, "duplicate.png", (64, 48), [([4, 4, 30, 30], category)], image_id=crowd)
    (root / "train" / "not_an_image.jpg").write_text("this is text")
    data["images"].append({"id": 9001, "file_name": "not_an_image.jpg", "width": 64, "height": 48})
    good = (root / "train" / "gray.png").read_bytes()
    (root / "train" / "truncated.png").write_bytes(good[: len(good) // 2])
    data["images"].append({"id": 9002, "file_name": "truncated.png", "width": 64, "height": 48})
    annotations.write_text(json.dumps(data))
    return root


def test_training_over_the_bad_corpus_finishes(compose_cfg, corpus):
    cfg = compose_cfg("train", [*TINY, f"data.root={corpus}"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
    assert "val/AP" in metrics


def test_two_process_ddp_over_the_bad_corpus_finishes(compose_cfg, corpus):
    cfg = compose_cfg("train", [*TINY, f"data.root={corpus}", "trainer.accelerator=cpu", "trainer.devices=2",
                                "+trainer.strategy=ddp_spawn"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_epoch"]))
