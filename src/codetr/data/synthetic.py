"""A small generated COCO-format dataset for the demo and the tests: coloured shapes (one shape per class) with
polygon instance masks on textured backgrounds, several objects per image, fully determined by the seed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star", "cross", "ellipse")
COLOURS = ((220, 50, 50), (50, 170, 60), (40, 90, 220), (230, 190, 30), (170, 60, 200), (30, 190, 200),
           (240, 120, 20), (120, 120, 120))


def _polygon(shape: str, cx: float, cy: float, r: float, rng: np.random.Generator) -> list[tuple[float, float]]:
    def ring(n, radius, phase=0.0, radii=None):
        return [(cx + (radii[i] if radii else radius) * math.cos(phase + 2 * math.pi * i / n),
                 cy + (radii[i] if radii else radius) * math.sin(phase + 2 * math.pi * i / n)) for i in range(n)]

    if shape == "circle":
        return ring(32, r)
    if shape == "square":
        return ring(4, r * math.sqrt(2), math.pi / 4)
    if shape == "triangle":
        return ring(3, r * 1.15, -math.pi / 2)
    if shape == "diamond":
        return ring(4, r * 1.1)
    if shape == "hexagon":
        return ring(6, r)
    if shape == "star":
        return ring(10, r, -math.pi / 2, [r if i % 2 == 0 else r * 0.45 for i in range(10)])
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    return [(cx + r * math.cos(t), cy + 0.6 * r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 32, endpoint=False)]


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(60, 200, 3)
    tilt = rng.uniform(-50, 50, (2, 3))
    image = base + xx[..., None] * tilt[0] + yy[..., None] * tilt[1]
    stripes = 12 * np.sin(2 * math.pi * (xx * rng.uniform(2, 8) + yy * rng.uniform(2, 8)))[..., None]
    return np.clip(image + stripes + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)


def _make_split(root: Path, split: str, count: int, size: int, num_classes: int, rng: np.random.Generator,
                first_id: int) -> dict:
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(count):
        image_id = first_id + index
        canvas = Image.fromarray(_background(size, rng))
        draw = ImageDraw.Draw(canvas)
        placed: list[tuple[float, float, float]] = []
        for _ in range(int(rng.integers(1, 5))):
            for _attempt in range(20):
                r = rng.uniform(0.1, 0.22) * size
                cx, cy = rng.uniform(r, size - r, 2)
                if all(math.hypot(cx - x, cy - y) > 0.8 * (r + q) for x, y, q in placed):
                    break
            else:
                continue
            placed.append((cx, cy, r))
            label = int(rng.integers(0, num_classes))
            polygon = _polygon(SHAPES[label % len(SHAPES)], cx, cy, r, rng)
            colour = tuple(int(np.clip(c + rng.normal(0, 15), 0, 255)) for c in COLOURS[label % len(COLOURS)])
            draw.polygon(polygon, fill=colour, outline=(20, 20, 20))
            xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
            x1, y1 = max(0.0, min(xs)), max(0.0, min(ys))
            x2, y2 = min(float(size), max(xs)), min(float(size), max(ys))
            annotations.append({
                "id": len(annotations) + 1 + first_id * 10, "image_id": image_id, "category_id": label + 1,
                "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                "area": round((x2 - x1) * (y2 - y1), 2), "iscrowd": 0,
                "segmentation": [[round(v, 2) for p in polygon for v in p]],
            })
        file_name = f"{image_id:06d}.jpg"
        canvas.save(folder / file_name, quality=92)
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    return {"images": images, "annotations": annotations}


def make_synthetic_coco(root: str | Path, num_train: int = 256, num_val: int = 64, image_size: int = 128,
                        num_classes: int = 4, seed: int = 0) -> Path:
    """Write ``root/{train,val}/*.jpg`` and ``root/annotations/{train,val}.json``; reuse them when they were made
    with the same parameters. Returns ``root``."""
    if not 1 <= num_classes <= len(SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    root = Path(root)
    params = {"num_train": num_train, "num_val": num_val, "image_size": image_size, "num_classes": num_classes,
              "seed": seed, "generator": "codetr.synthetic.v1"}
    marker = root / "annotations" / "params.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        return root
    rng = np.random.default_rng(seed)
    categories = [{"id": k + 1, "name": SHAPES[k], "supercategory": "shape"} for k in range(num_classes)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count, first_id in (("train", num_train, 1), ("val", num_val, 1_000_001)):
        data = _make_split(root, split, count, image_size, num_classes, rng, first_id)
        data["categories"] = categories
        data["info"] = {"description": "codetr synthetic shapes", **params}
        (root / "annotations" / f"{split}.json").write_text(json.dumps(data))
    marker.write_text(json.dumps(params))
    return root
