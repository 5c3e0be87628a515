"""Data pipeline throughput: LSJ (with Copy-Paste) and DETR augmentation on generated 640x480 JPEGs with polygon
masks: images/s of the dataset alone in the main process (one worker's throughput), and of the real training
loader (sampler, per-sample seeding, collation into padded uint8 batches) with 0 and 2 worker processes."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from codetr.bench.timing import Measurement, peak_rss_mib
from codetr.data import CocoDataModule


def make_images(root: Path, count: int = 24, width: int = 640, height: int = 480, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
        canvas = Image.fromarray(pixels)
        draw = ImageDraw.Draw(canvas)
        for _ in range(8):
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
        augs = {"lsj 1024 + copy-paste": {"name": "lsj", "canvas_size": 1024, "copy_paste": True},
                "detr multi-scale": {"name": "detr"}}
        for name, aug in augs.items():
            module = CocoDataModule(str(images), str(ann), aug=aug, batch_size=2, num_workers=0, pin_memory=False)
            module.setup("fit")
            dataset = module.datasets["train"]
            dataset[0]  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                for index in range(len(dataset)):
                    dataset[index]
                times.append(time.perf_counter() - start)
            row = Measurement(f"train pipeline {name}", {"images": count, "size": "640x480", "workers": 1}, times,
                              peak_rss_mib())
            row.extra = {"images_per_s": round(count / row.median_s, 1)}
            rows.append(row)
            rows += [loader_row(name, images, ann, aug, count, workers, repeats) for workers in LOADER_WORKERS]
    return rows


LOADER_WORKERS = (0, 2)


def loader_row(name: str, images: Path, ann: Path, aug: dict, count: int, workers: int, repeats: int) -> Measurement:
    """One epoch of the training loader per repeat (workers persistent; the first epoch, which starts them, is a
    warm-up and not timed)."""
    module = CocoDataModule(str(images), str(ann), aug=aug, batch_size=2, num_workers=workers, pin_memory=False,
                            persistent_workers=workers > 0)
    loader = module.train_dataloader()
    for _ in loader:  # warm-up epoch
        pass
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in loader:
            pass
        times.append(time.perf_counter() - start)
    row = Measurement(f"train loader {name}", {"images": count, "size": "640x480", "batch": 2,
                                               "num_workers": workers}, times, peak_rss_mib())
    row.extra = {"images_per_s": round(count / row.median_s, 1)}
    return row
