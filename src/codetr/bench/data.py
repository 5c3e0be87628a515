"""Data pipeline throughput and memory: LSJ (with Copy-Paste) and DETR augmentation on generated 640x480 JPEGs with
20 polygon instances each, with instance masks in the targets (what a mask branch trains on) and, for DETR
augmentation, without: images/s of the dataset alone in the main process (one worker's throughput), and of the real
training loader (sampler, per-sample seeding, collation into padded uint8 batches) with 0 and 2 worker processes;
``mask_mib_per_batch``: the masks of the largest collated batch of 2 (uint8, one byte per canvas pixel and
instance)."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from codetr.bench.timing import Measurement, peak_rss_mib
from codetr.data import CocoDataModule

INSTANCES = 20


def make_images(root: Path, count: int = 24, width: int = 640, height: int = 480, seed: int = 0,
                instances: int = INSTANCES) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        canvas = Image.fromarray(pixels)
        draw = ImageDraw.Draw(canvas)
        for _ in range(instances):
            x, y = rng.uniform(0, width - 120), rng.uniform(0, height - 120)
            w, h = rng.uniform(20, 120, 2)
            polygon = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
            draw.polygon(polygon, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": 1, "iscrowd": 0,
                                "bbox": [x, y, w, h], "area": w * h, "segmentation": [[v for p in polygon for v in p]]})
        canvas.save(root / "images" / f"{i}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": width, "height": height})
    ann = root / "annotations.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "box"}]}))
    return root / "images", ann


def run(device: str = "cpu", repeats: int = 3, count: int = 24) -> list[Measurement]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images, ann = make_images(Path(tmp), count)
        augs = {"lsj 1024 + copy-paste, masks": ({"name": "lsj", "canvas_size": 1024, "copy_paste": True}, True),
                "detr multi-scale, masks": ({"name": "detr"}, True),
                "detr multi-scale, boxes": ({"name": "detr"}, False)}
        for name, (aug, masks) in augs.items():
            module = CocoDataModule(str(images), str(ann), aug=aug, batch_size=2, num_workers=0, pin_memory=False,
                                    with_masks=masks)
            module.setup("fit")
            dataset = module.datasets["train"]
            dataset[0]  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for index in range(len(dataset)):
                    dataset[index]
                times.append(time.perf_counter() - start)
            row = Measurement(f"train pipeline {name}", {"images": count, "size": "640x480", "instances": INSTANCES,
                                                         "workers": 1}, times, peak_rss_mib())
            row.extra = {"images_per_s": round(count / row.median_s, 1)}
            rows.append(row)
            rows += [loader_row(name, images, ann, aug, masks, count, workers, repeats) for workers in LOADER_WORKERS]
    return rows


LOADER_WORKERS = (0, 2)


def loader_row(name: str, images: Path, ann: Path, aug: dict, masks: bool, count: int, workers: int,
               repeats: int) -> Measurement:
    """One epoch of the training loader per repeat (workers persistent; the first epoch, which starts them, is a
    warm-up and not timed)."""
    module = CocoDataModule(str(images), str(ann), aug=aug, batch_size=2, num_workers=workers, pin_memory=False,
                            persistent_workers=workers > 0, with_masks=masks)
    loader = module.train_dataloader()
    mask_bytes = 0
    for batch in loader:  # warm-up epoch
        mask_bytes = max(mask_bytes, sum(t["masks"].nbytes for t in batch.targets if "masks" in t))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - start)
    row = Measurement(f"train loader {name}", {"images": count, "size": "640x480", "instances": INSTANCES,
                                               "batch": 2, "num_workers": workers}, times, peak_rss_mib())
    row.extra = {"images_per_s": round(count / row.median_s, 1), "mask_mib_per_batch": round(mask_bytes / 2**20, 1)}
    return row
