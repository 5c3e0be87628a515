"""One COCO-format detection dataset for COCO 2017, LVIS v1, Objects365 v2 and custom COCO json + image folder.

Category ids are mapped to contiguous labels ``0..K-1`` (sorted by id) and back (``category_ids``). Bad input is
handled before or during training without stopping it (every case is counted and reported once):

* missing image folder / annotation file, or a json that is not COCO: ``FileNotFoundError`` / ``ValueError``
  naming the path or the missing field, raised when the dataset is built;
* duplicated image ids: later duplicates dropped; images with a side < ``min_size`` (json size) dropped;
* annotations: ``iscrowd`` ones are not training targets (they stay in the json for evaluation); unknown category
  ids, non-finite or non-positive-size boxes dropped; boxes clipped to the image;
* unreadable / truncated / non-image files: skipped at load time, another image is drawn instead;
* grayscale / palette / RGBA / 16-bit images converted to RGB; EXIF orientation applied; a decoded size that differs
  from the json's width/height is trusted (boxes clipped to it).
"""

from __future__ import annotations

import json
import logging
import math
import random
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision import tv_tensors

log = logging.getLogger(__name__)
REQUIRED_FIELDS = ("images", "annotations", "categories")


def read_coco_json(path: str | Path) -> dict:
    """Load and validate a COCO-format annotation file (errors name the file and the field)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - one error type for every "not COCO" case
            f"{path} is not a COCO annotation file: top level is {type(data).__name__}, not an object")
    for field in REQUIRED_FIELDS:
        if field not in data:
            raise ValueError(f"{path} is not a COCO annotation file: missing field '{field}'")
    for image in data["images"]:
        for key in ("id", "width", "height"):
            if key not in image:
                raise ValueError(f"{path}: image entry {image.get('id', '?')} lacks '{key}'")
    for category in data["categories"]:
        if "id" not in category:
            raise ValueError(f"{path}: category entry lacks 'id'")
    return data


def load_rgb(path: Path) -> torch.Tensor:
    """Decode any PIL-readable image to ``(3, H, W)`` uint8 RGB with the EXIF orientation applied."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("I;16", "I;16B", "I;16L", "I"):
            array = np.asarray(image, dtype=np.float32)
            peak = max(float(array.max()), 1.0)
            image = Image.fromarray((array * (255.0 / (65535.0 if peak > 255 else 255.0))).clip(0, 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


class CocoDetection(Dataset):
    """COCO-format dataset returning transform-ready samples.

    A sample is a dict: ``image`` (``tv_tensors.Image`` uint8 ``(3, H, W)``), ``boxes`` (``tv_tensors.BoundingBoxes``
    xyxy absolute pixels), ``labels`` (int64 contiguous), ``masks`` (``tv_tensors.Mask`` ``(N, H, W)``, only with
    ``with_masks``), ``image_id`` (original id) and ``orig_size`` (``(h, w)`` of the decoded image).

    Args:
        images_dir / annotation_file: COCO layout; LVIS entries without ``file_name`` are found from ``coco_url``.
        transform: ``callable(sample) -> sample`` (e.g. the LSJ / DETR pipelines).
        mix: optional ``callable(sample, other_sample) -> sample`` applied after ``transform`` with another random
            image (Copy-Paste).
        min_size: drop images whose json width or height is below it (reference 32).
        max_retries: how many other images to try when one cannot be read or loses all its boxes.
    """

    def __init__(
        self,
        images_dir: str | Path,
        annotation_file: str | Path,
        transform: Callable[[dict], dict] | None = None,
        with_masks: bool = False,
        mix: Callable[[dict, dict], dict] | None = None,
        min_size: int = 32,
        max_retries: int = 20,
    ):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images_dir}")
        self.annotation_file = Path(annotation_file)
        data = read_coco_json(self.annotation_file)
        self.transform, self.mix, self.with_masks, self.max_retries = transform, mix, with_masks, max_retries
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.stats: Counter = Counter()
        self.images, seen = [], set()
        for image in data["images"]:
            if image["id"] in seen:
                self.stats["duplicate image ids dropped"] += 1
                continue
            seen.add(image["id"])
            if min(image["width"], image["height"]) < min_size:
                self.stats[f"images smaller than {min_size} px dropped"] += 1
                continue
            self.images.append(image)
        kept_ids = {image["id"] for image in self.images}
        self.annotations: dict[int, list[dict]] = {image["id"]: [] for image in self.images}
        for ann in data["annotations"]:
            if ann.get("image_id") not in kept_ids:
                continue
            if ann.get("iscrowd", 0):
                self.stats["crowd annotations (evaluation only)"] += 1
                continue
            if ann.get("category_id") not in self.label_of:
                self.stats["annotations with unknown category ids dropped"] += 1
                continue
            box = ann.get("bbox")
            if not box or len(box) != 4 or not all(isinstance(v, int | float) and math.isfinite(v) for v in box):
                self.stats["annotations with missing or non-finite boxes dropped"] += 1
                continue
            if box[2] <= 0 or box[3] <= 0:
                self.stats["annotations with zero or negative size dropped"] += 1
                continue
            self.annotations[ann["image_id"]].append(ann)
        if not self.images:
            raise ValueError(f"{self.annotation_file}: no usable images (empty dataset)")
        self._report()

    def _report(self) -> None:
        if self.stats:
            details = "; ".join(f"{n} {what}" for what, n in sorted(self.stats.items()))
            log.warning("%s: %s", self.annotation_file.name, details)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, entry: dict) -> Path:
        if "file_name" in entry:
            return self.images_dir / entry["file_name"]
        url = entry.get("coco_url", "")
        name = url.rsplit("/", 1)[-1]
        path = self.images_dir / name
        if not path.exists() and "/" in url:  # LVIS: val images live in COCO's train2017 or val2017
            path = self.images_dir.parent / url.rsplit("/", 2)[-2] / name
        return path

    def load(self, index: int) -> dict:
        """Decoded image and its cleaned annotations (no transform)."""
        entry = self.images[index]
        image = load_rgb(self.image_path(entry))
        height, width = image.shape[-2:]
        if (height, width) != (entry["height"], entry["width"]):
            self.stats["images whose size differs from the json (boxes clipped to the real size)"] += 1
        anns = self.annotations[entry["id"]]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            self.stats["boxes outside the image dropped"] += int((~keep).sum())
        labels = torch.tensor([self.label_of[a["category_id"]] for a in anns], dtype=torch.long)
        sample = {
            "image": tv_tensors.Image(image),
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": labels[keep],
            "image_id": int(entry["id"]),
            "orig_size": (int(height), int(width)),
        }
        if self.with_masks:
            kept = [a for a, k in zip(anns, keep.tolist()) if k]
            sample["masks"] = tv_tensors.Mask(self._masks(kept, height, width, boxes[keep]))
        return sample

    @staticmethod
    def _masks(anns: list[dict], height: int, width: int, boxes: torch.Tensor) -> torch.Tensor:
        """Instance masks ``(N, H, W)`` uint8 from polygons / RLE; a box-shaped mask when none is given."""
        from pycocotools import mask as mask_utils

        masks = torch.zeros(len(anns), height, width, dtype=torch.uint8)
        for i, ann in enumerate(anns):
            segmentation = ann.get("segmentation")
            if segmentation:
                if isinstance(segmentation, list):
                    rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
                elif isinstance(segmentation.get("counts"), list):
                    rle = mask_utils.frPyObjects(segmentation, height, width)
                else:
                    rle = segmentation
                with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword notice, not ours
                    warnings.simplefilter("ignore", DeprecationWarning)
                    decoded = torch.from_numpy(mask_utils.decode(rle))
                if decoded.shape == masks.shape[1:]:
                    masks[i] = decoded
                    continue
            x1, y1, x2, y2 = boxes[i].round().int().tolist()
            masks[i, y1:y2, x1:x2] = 1
        return masks

    def _prepared(self, index: int) -> dict | None:
        """The transformed sample, or None when the image cannot be read or the pipeline discards it."""
        try:
            sample = self.load(index)
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for broken / non-image files
            if self.stats["unreadable images skipped"] == 0:
                log.warning("cannot read %s (%s); skipping it and drawing another image (further unreadable images "
                            "are skipped silently and counted in dataset.stats)", self.image_path(self.images[index]),
                            error)
            self.stats["unreadable images skipped"] += 1
            return None
        if self.transform is not None:
            sample = self.transform(sample)
        if sample.pop("discard", False):
            self.stats["augmented samples that lost all boxes redrawn"] += 1
            return None
        return sample

    def _draw(self, index: int) -> dict:
        """``index``'s sample, or a random other one when it is unusable (up to ``max_retries`` times)."""
        for _ in range(self.max_retries + 1):
            sample = self._prepared(index)
            if sample is not None:
                return sample
            index = random.randrange(len(self))
        raise RuntimeError(f"{self.annotation_file}: {self.max_retries + 1} images in a row could not be used")

    def __getitem__(self, index: int) -> dict:
        sample = self._draw(index)
        if self.mix is not None:
            sample = self.mix(sample, self._draw(random.randrange(len(self))))
        return sample
