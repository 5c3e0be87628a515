"""One COCO-format detection dataset for COCO 2017, LVIS v1, Objects365 v2 and custom COCO json + image folder.

Category ids are mapped to contiguous labels ``0..K-1`` (sorted by id) and back (``category_ids``). Bad input is
handled before or during training without stopping it (every case is counted and reported once):

* missing image folder / annotation file, a json that is not COCO or breaks its schema (wrong types, null
  entries, duplicated category ids, every annotation orphaned ...): ``FileNotFoundError`` / ``ValueError`` naming
  the path, the entry and the field, raised when the dataset is built (:mod:`codetr.data.annotations`);
* duplicated image ids: later duplicates dropped; images with a side < ``min_size`` (json size) dropped; images
  with more than ``max_boxes_per_image`` usable boxes dropped (training only: such an image costs gigabytes in
  matching and the auxiliary heads' assigners);
* annotations: ``iscrowd`` ones are not training targets (they stay in the json for evaluation); orphaned ones
  (``image_id`` of no image), unknown category ids, non-finite or non-positive-size boxes dropped; boxes clipped
  to the image; a segmentation pycocotools cannot use (:mod:`codetr.data.masks`) is replaced by a box-shaped mask;
* unreadable / truncated / non-image files, images over ``max_image_pixels`` and wide / float images whose value
  range cannot be mapped (:mod:`codetr.data.images`): skipped at load time, another image is drawn instead;
* grayscale / palette / RGBA / 16-bit / float images converted to RGB; EXIF orientation applied; a decoded size that
  differs from the json's width/height is trusted (boxes clipped to it).
"""

from __future__ import annotations

import logging
import math
import random
import unicodedata
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from codetr.data.annotations import Notes, check_coco, load_json, read_coco_json
from codetr.data.images import ImageTooLargeError, UnsupportedPixelValuesError, load_rgb
from codetr.data.masks import decode_segmentation, segmentation_problem

__all__ = ["CocoDetection", "load_rgb", "read_coco_json"]
log = logging.getLogger(__name__)
LISTED = 5  # files / annotation ids named in one warning
# A box edge this far outside its image (fraction of the image side, at least one pixel) is counted and named when
# clipped; one more than a whole image side outside is not an annotation of this image: dropped and named.
CLIP_TOLERANCE = 0.01

def _outside(box: list[float], width: float, height: float) -> float:
    """How far the xywh ``box`` reaches outside a ``width x height`` image, as a fraction of the image side (0
    inside)."""
    x, y, w, h = box
    return max(-x / width, -y / height, (x + w - width) / width, (y + h - height) / height, 0.0)


def _normalised_variant(path: Path) -> Path:
    """``path``, or its Unicode-normalised twin (NFC / NFD) when only that exists: a json written on one system
    names "é" composed while the file system (macOS, some copies from it) stores it decomposed, or the reverse."""
    if path.exists():
        return path
    for form in ("NFC", "NFD"):
        other = Path(unicodedata.normalize(form, str(path)))
        if other != path and other.exists():
            return other
    return path


class CocoDetection(Dataset):
    """COCO-format dataset returning transform-ready samples.

    A sample is a dict: ``image`` (``tv_tensors.Image`` uint8 ``(3, H, W)``), ``boxes`` (``tv_tensors.BoundingBoxes``
    xyxy absolute pixels), ``labels`` (int64 contiguous), ``masks`` (``tv_tensors.Mask`` ``(N, H, W)``, only with
    ``with_masks``), ``image_id`` (original id) and ``orig_size`` (``(h, w)`` of the decoded image).

    Args:
        images_dir / annotation_file: COCO layout (``.json`` or ``.json.gz``); LVIS entries without ``file_name``
            are found from ``coco_url``.
        transform: ``callable(sample) -> sample`` (e.g. the LSJ / DETR pipelines).
        mix: optional ``callable(sample, other_sample) -> sample`` applied after ``transform`` with another random
            image (Copy-Paste).
        min_size: drop images whose json width or height is below it (reference 32).
        max_retries: how many other images to try when one cannot be read or loses all its boxes.
        max_image_pixels: images with more pixels are skipped (None: PIL's decompression-bomb limit).
        max_boxes_per_image: images with more usable boxes are dropped before training (None: no limit).
        for_evaluation: the file is scored by COCO evaluation: unique integer annotation / image ids are required.
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
        max_image_pixels: int | None = None,
        max_boxes_per_image: int | None = None,
        for_evaluation: bool = False,
    ):
        self.images_dir = Path(images_dir)
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.images_dir}")
        self.annotation_file = Path(annotation_file)
        data = load_json(self.annotation_file)
        self.stats: Notes = check_coco(data, self.annotation_file, for_evaluation)
        self.for_evaluation = for_evaluation
        self.transform, self.mix, self.with_masks, self.max_retries = transform, mix, with_masks, max_retries
        self.max_image_pixels = max_image_pixels
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        self.lvis_format = bool(data["images"]) and "not_exhaustive_category_ids" in data["images"][0]
        self.images = self._usable_images(data["images"], min_size)
        self.annotations = self._usable_annotations(data["annotations"])
        if with_masks:
            self._drop_unusable_segmentations()
        if max_boxes_per_image is not None:
            self._drop_crowded_images(max_boxes_per_image)
        if not self.images:
            raise ValueError(f"{self.annotation_file}: no usable images (empty dataset)")
        self._warned: set[str] = set()
        self._report()

    def _usable_images(self, images: list[dict], min_size: int) -> list[dict]:
        """Images to use. One file listed under two ids would train twice, each copy teaching the other's objects
        as background: for training the later id's annotations are merged into the first (named in a warning),
        an evaluation file is refused (naming both ids)."""
        kept, seen = [], set()
        by_file: dict[str, int] = {}
        self._merged_ids: dict[int, int] = {}
        merged: list[str] = []
        for image in images:
            if image["id"] in seen:
                self.stats["duplicate image ids dropped"] += 1
                continue
            seen.add(image["id"])
            name = image.get("file_name") or image.get("coco_url")
            key = unicodedata.normalize("NFC", str(name))
            if key in by_file:
                first = by_file[key]
                if self.for_evaluation:
                    raise ValueError(f"{self.annotation_file}: {name!r} is listed under two image ids, {first} and "
                                     f"{image['id']}; evaluation would score the image twice against different "
                                     "ground truth. Merge the two entries (and their annotations) into one")
                self._merged_ids[image["id"]] = first
                merged.append(f"{name} (ids {first} and {image['id']})")
                continue
            by_file[key] = image["id"]
            if min(image["width"], image["height"]) < min_size:
                self.stats[f"images smaller than {min_size} px dropped"] += 1
                continue
            kept.append(image)
        if merged:
            self.stats.add("images listed under two ids merged into the first", len(merged),
                           ", ".join(merged[:LISTED]) + (" ..." if len(merged) > LISTED else ""))
        return kept

    def _usable_annotations(self, annotations: list[dict]) -> dict[int, list[dict]]:
        """Training targets per kept image id (orphans and null boxes were counted by :func:`check_coco`)."""
        per_image: dict[int, list[dict]] = {image["id"]: [] for image in self.images}
        sizes = {image["id"]: (image["width"], image["height"]) for image in self.images}
        names = {image["id"]: image.get("file_name", image["id"]) for image in self.images}
        clipped, absurd, nonfinite = [], [], []
        for ann in annotations:
            image_id = self._merged_ids.get(ann["image_id"], ann["image_id"])
            if image_id not in per_image:
                continue
            if ann.get("iscrowd", 0):
                self.stats["crowd annotations (evaluation only)"] += 1
                continue
            if ann["category_id"] not in self.label_of:
                self.stats["annotations with unknown category ids dropped"] += 1
                continue
            box = ann.get("bbox")
            if box is None:
                continue
            where = f"annotation {ann.get('id', '?')} of {names[image_id]}"
            if not box or not all(v is not None and math.isfinite(v) for v in box):
                self.stats["annotations with missing or non-finite boxes dropped"] += 1
                nonfinite.append(where)
                continue
            if box[2] <= 0 or box[3] <= 0:
                self.stats["annotations with zero or negative size dropped"] += 1
                continue
            outside = _outside(box, *sizes[image_id])
            if outside > 1.0:
                absurd.append(f"{where}: bbox {[round(v, 1) for v in box]} for a {sizes[image_id][0]}x"
                              f"{sizes[image_id][1]} image")
                continue
            if outside > CLIP_TOLERANCE:
                clipped.append(f"{where}: bbox {[round(v, 1) for v in box]}")
            if image_id != ann["image_id"]:
                ann = {**ann, "image_id": image_id}
            per_image[image_id].append(ann)
        for kind, found in (("boxes far outside their image dropped (more than a whole image side)", absurd),
                            ("boxes reaching outside their image clipped", clipped)):
            if found:
                self.stats.add(kind, len(found), "; ".join(found[:LISTED]) + (" ..." if len(found) > LISTED else ""))
        if nonfinite:
            self.stats.examples["annotations with missing or non-finite boxes dropped"] = "; ".join(nonfinite[:LISTED])
        return per_image

    def _drop_unusable_segmentations(self) -> None:
        """Segmentations pycocotools cannot use (checked against the json size) become box-shaped masks."""
        named: list[str] = []
        for image in self.images:
            anns = self.annotations[image["id"]]
            for index, ann in enumerate(anns):
                problem = segmentation_problem(ann.get("segmentation"), int(image["height"]), int(image["width"]))
                if problem is None:
                    continue
                anns[index] = {**ann, "segmentation": None}
                self.stats["unusable segmentations replaced by box masks"] += 1
                if len(named) < LISTED:
                    named.append(f"annotation {ann.get('id', '?')} of {image.get('file_name', image['id'])} "
                                 f"({problem})")
        if named:
            log.warning("%s: %d segmentation(s) cannot be used, their boxes get box-shaped masks: %s%s",
                        self.annotation_file, self.stats["unusable segmentations replaced by box masks"],
                        "; ".join(named), " ..." if self.stats["unusable segmentations replaced by box masks"]
                        > len(named) else "")

    def _drop_crowded_images(self, max_boxes: int) -> None:
        crowded = [image for image in self.images if len(self.annotations[image["id"]]) > max_boxes]
        if not crowded:
            return
        dropped = {image["id"] for image in crowded}
        self.images = [image for image in self.images if image["id"] not in dropped]
        self.stats[f"images with more than {max_boxes} boxes dropped"] += len(crowded)
        names = ", ".join(f"{image.get('file_name', image['id'])} ({len(self.annotations[image['id']])} boxes)"
                          for image in crowded[:LISTED])
        log.warning("%s: %d image(s) have more than %d boxes (data.datamodule.max_boxes_per_image) and are not "
                    "trained on: %s%s", self.annotation_file, len(crowded), max_boxes, names,
                    " ..." if len(crowded) > LISTED else "")
        for image_id in dropped:
            del self.annotations[image_id]

    def _report(self) -> None:
        if self.stats:
            log.warning("%s: %s", self.annotation_file.name, self.stats.describe())

    def _warn_once(self, kind: str, message: str, *args: object) -> None:
        """Counts ``kind``; the first occurrence (per process) is logged with ``message``."""
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning(message + " (further cases are counted in dataset.stats['%s'])", *args, kind)
        self.stats[kind] += 1

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def num_boxes(self) -> int:
        """Training targets left after the checks (crowd / bad / orphaned annotations excluded)."""
        return sum(len(anns) for anns in self.annotations.values())

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, entry: dict) -> Path:
        if "file_name" in entry:
            return _normalised_variant(self.images_dir / entry["file_name"])
        url = entry.get("coco_url", "")
        name = url.rsplit("/", 1)[-1]
        path = self.images_dir / name
        if not path.exists() and "/" in url:  # LVIS: val images live in COCO's train2017 or val2017
            path = self.images_dir.parent / url.rsplit("/", 2)[-2] / name
        return path

    def load(self, index: int) -> dict:
        """Decoded image and its cleaned annotations (no transform)."""
        entry = self.images[index]
        path = self.image_path(entry)
        image = load_rgb(path, self.max_image_pixels)
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
            sample["masks"] = tv_tensors.Mask(self._masks(kept, height, width, boxes[keep], path))
        return sample

    def _masks(self, anns: list[dict], height: int, width: int, boxes: torch.Tensor, path: Path) -> torch.Tensor:
        """Instance masks ``(N, H, W)`` uint8 from polygons / RLE; a box-shaped mask when there is none or it cannot
        be decoded at the decoded image size (counted, the first case named)."""
        masks = torch.zeros(len(anns), height, width, dtype=torch.uint8)
        for i, ann in enumerate(anns):
            segmentation = ann.get("segmentation")
            if segmentation:
                problem = segmentation_problem(segmentation, height, width)
                if problem is None:
                    try:
                        masks[i] = decode_segmentation(segmentation, height, width)
                        continue
                    except Exception as error:  # noqa: BLE001 - pycocotools raises bare Exception / TypeError
                        problem = f"pycocotools: {error}"
                self._warn_once("segmentations not decodable at load time (box masks used)",
                                "%s: annotation %s: %s; a box-shaped mask is used", path, ann.get("id", "?"), problem)
            x1, y1, x2, y2 = boxes[i].round().int().tolist()
            masks[i, y1:y2, x1:x2] = 1
        return masks

    def _prepared(self, index: int) -> dict | None:
        """The transformed sample, or None when the image cannot be read or the pipeline discards it."""
        path = self.image_path(self.images[index])
        try:
            sample = self.load(index)
        except ImageTooLargeError as error:
            self._warn_once("images over the pixel limit skipped", "%s; skipping it and drawing another image",
                            error)
            return None
        except UnsupportedPixelValuesError as error:
            self._warn_once("images with unmappable pixel values skipped", "%s; skipping it and drawing another "
                            "image", error)
            return None
        except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for broken / non-image files
            self._warn_once("unreadable images skipped", "cannot read %s (%s); skipping it and drawing another "
                            "image", path, error)
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
