"""Images in, batches out: what :meth:`codetr.inference.Detector.predict` accepts and how it prepares it.

Accepted images: a path (any PIL-readable file; decoded as the datasets decode, EXIF orientation applied), a PIL
image, a numpy ``(H, W, 3)`` / ``(H, W)`` uint8 array (RGB) or a uint8 tensor ``(3, H, W)`` / ``(H, W)``; one or a
sequence. Each is resized by the recipe's test pipeline (:func:`codetr.data.transforms.build_pipeline`, the
evaluation's) and batched with :func:`codetr.data.collate` (padding bottom/right), so a prediction sees exactly the
input an evaluation would.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors

from codetr.data.coco import load_rgb
from codetr.data.collate import DetectionBatch, collate
from codetr.data.transforms import build_pipeline

ImageLike = Any  # str | Path | PIL.Image.Image | np.ndarray | Tensor


def is_single_image(images: Any) -> bool:
    """True for one image (path, PIL, array, tensor), False for a sequence of them."""
    if isinstance(images, str | Path) or hasattr(images, "getpixel"):
        return True
    if isinstance(images, np.ndarray | Tensor):
        return images.ndim == 2 or (images.ndim == 3 and (images.shape[0] == 3 or images.shape[-1] in (1, 3, 4)))
    return False


def to_uint8_rgb(image: ImageLike) -> Tensor:
    """Any accepted image -> ``(3, H, W)`` uint8 RGB tensor (errors name the type / shape at fault)."""
    if isinstance(image, str | Path):
        return load_rgb(Path(image))
    if hasattr(image, "getpixel"):  # PIL image
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
        if image.ndim == 3:
            image = image.permute(2, 0, 1)
    if not isinstance(image, Tensor):
        raise TypeError(f"cannot read an image from {type(image).__name__}: pass a path, a PIL image, a numpy array "
                        f"or a uint8 tensor")
    if image.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0-255), got {image.dtype}; convert with (x * 255).round().byte() "
                        f"if the values are in 0..1")
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image (3, H, W) / (H, W, 3) / (H, W), got shape {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    return image[:3].contiguous()


def resize_pipeline(test_transform: Mapping[str, Any], scale: float = 1.0) -> Callable[[dict], dict]:
    """The recipe's test-time resize; ``scale`` multiplies its sizes (test-time augmentation scales)."""
    params = dict(test_transform)
    if scale != 1.0:
        for key in ("canvas_size", "test_scale", "test_max_size"):
            if key in params and params[key] is not None:
                params[key] = max(1, round(float(params[key]) * scale))
    return build_pipeline(params, train=False)


def prepare_batch(images: Sequence[Tensor], pipeline: Callable[[dict], dict], size_divisor: int = 1) -> DetectionBatch:
    """uint8 ``(3, H, W)`` images -> a padded :class:`DetectionBatch` (``scale_factors`` map predictions back)."""
    samples = []
    for index, image in enumerate(images):
        h, w = image.shape[-2:]
        sample = {"image": tv_tensors.Image(image),
                  "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.zeros(0, dtype=torch.long), "image_id": index, "orig_size": (h, w)}
        samples.append(pipeline(sample))
    return collate(samples, size_divisor=size_divisor)
