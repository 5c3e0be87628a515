"""Instance masks from COCO segmentations (polygons or RLE), checked before pycocotools sees them.

pycocotools rejects some malformed segmentations with exceptions that name nothing (``input type is not
supported.``, ``TypeError``), loops for hours over polygons with astronomically large coordinates, and decodes an
RLE whose run lengths fall short of the image into uninitialised memory. :func:`segmentation_problem` says what is
wrong with a segmentation (None when it is usable); the dataset then keeps the annotation's box with a box-shaped
mask (what Copy-Paste would use without masks) and counts it, naming the file and the annotation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

COORDINATE_MARGIN = 1.0  # polygon points may lie up to one image size outside the image


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def rle_counts_total(counts: str) -> int:
    """Sum of the run lengths of a compressed COCO RLE string (the pixels it covers). The format: each run length
    is a little-endian sequence of 5-bit groups stored as ``chr(48 + group)``, bit 0x20 = more groups follow, bit
    0x10 of the last group = negative; from the third run on, the value is a difference to the run two before."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("the RLE string ends inside a run length")
            group = ord(counts[position]) - 48
            if not 0 <= group < 64:
                raise ValueError(f"character {counts[position]!r} is not part of the RLE alphabet")
            value |= (group & 0x1F) << shift
            more = bool(group & 0x20)
            position, shift = position + 1, shift + 5
            if not more and group & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("a negative run length")
        runs.append(value)
    return sum(runs)


def _polygon_problem(polygons: list, height: int, width: int) -> str | None:
    if not polygons:
        return None
    if all(_number(v) for v in polygons):
        return "a flat list of coordinates, not a list of polygons ([[x1, y1, x2, y2, ...]])"
    for index, polygon in enumerate(polygons):
        if not isinstance(polygon, list) or not all(_number(v) for v in polygon):
            return f"polygon {index} is not a list of finite numbers"
        if len(polygon) < 6 or len(polygon) % 2:
            return f"polygon {index} has {len(polygon)} coordinates (needs an even number, at least 3 points)"
        xs, ys = np.asarray(polygon[0::2], dtype=np.float64), np.asarray(polygon[1::2], dtype=np.float64)
        if (xs.min() < -COORDINATE_MARGIN * width or xs.max() > (1 + COORDINATE_MARGIN) * width
                or ys.min() < -COORDINATE_MARGIN * height or ys.max() > (1 + COORDINATE_MARGIN) * height):
            return f"polygon {index} has points far outside the {width} x {height} image"
    return None


def _rle_problem(rle: dict, height: int, width: int) -> str | None:
    size, counts = rle.get("size"), rle.get("counts")
    if not (isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size)):
        return f"RLE 'size' must be [height, width], got {size!r}"[:120]
    if tuple(size) != (height, width):
        return f"RLE size {size} does not fit the {height} x {width} image"
    if isinstance(counts, list):
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counts):
            return "RLE 'counts' must be non-negative integers"
        total = sum(counts)
    elif isinstance(counts, str):
        try:
            total = rle_counts_total(counts)
        except ValueError as error:
            return f"RLE 'counts' string is broken: {error}"
    else:
        return f"RLE 'counts' must be a string or a list of integers, got {type(counts).__name__}"
    if total != height * width:
        return f"RLE run lengths cover {total} pixels, the {height} x {width} image has {height * width}"
    return None


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """What makes ``segmentation`` unusable for a ``height x width`` image, or None (also for no segmentation)."""
    if segmentation is None or segmentation == [] or segmentation == {}:
        return None
    if isinstance(segmentation, list):
        return _polygon_problem(segmentation, height, width)
    if isinstance(segmentation, dict):
        return _rle_problem(segmentation, height, width)
    return f"a segmentation must be polygons or RLE, got {type(segmentation).__name__}"


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> torch.Tensor:
    """``(height, width)`` uint8 0/1 mask of a segmentation that passed :func:`segmentation_problem`."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools' numpy-2 copy-keyword notice, not ours
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = torch.from_numpy(mask_utils.decode(rle))
    if decoded.shape != (height, width) or (decoded.numel() and int(decoded.max()) > 1):
        raise ValueError(f"decoded to shape {tuple(decoded.shape)} with values up to {int(decoded.max())}")
    return decoded
