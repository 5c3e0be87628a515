"""Decoding one image file to ``(3, H, W)`` uint8 RGB, with a pixel limit and value-range conversion.

* A file over ``max_pixels`` (``data.datamodule.max_image_pixels``) raises :class:`ImageTooLargeError` from the
  header alone, before anything is decoded; PIL's own ``DecompressionBombError`` (its global limit) is replaced
  by that limit, and is turned into the same error when no limit is given.
* 16-bit, 32-bit integer and float (``F``, e.g. float TIFF) images are converted by their value range: floats in
  ``0..1`` are scaled by 255, values in ``0..255`` are kept, values in ``0..65535`` are scaled by 255 / 65535.
  Anything else (negative, non-finite or larger values) cannot be mapped without guessing and raises
  :class:`UnsupportedPixelValuesError` naming the file and the range.
* Grayscale / palette / RGBA / CMYK ... are converted to RGB (alpha composited on black); EXIF orientation applied.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class ImageTooLargeError(ValueError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class UnsupportedPixelValuesError(ValueError):
    """A 16 / 32-bit or float image whose values cannot be mapped to 0..255 by their range."""


@contextlib.contextmanager
def _pixel_limit_of_our_own() -> Iterator[None]:
    """PIL checks every ``Image.open`` against its global ``MAX_IMAGE_PIXELS``; ours (a per-dataset setting) is
    checked instead, so PIL's is lifted while the header is read."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def open_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """``Image.open`` (header only) refusing images over ``max_pixels`` (None: PIL's own limit)."""
    try:
        if max_pixels is None:
            image = Image.open(path)
        else:
            with _pixel_limit_of_our_own():
                image = Image.open(path)
    except Image.DecompressionBombError as error:
        raise ImageTooLargeError(f"{path}: {error}") from error
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(f"{path}: {width} x {height} = {width * height} pixels is over the limit of "
                                 f"{max_pixels} (data.datamodule.max_image_pixels)")
    return image


def wide_to_uint8(values: np.ndarray, path: str | Path) -> np.ndarray:
    """uint8 from a 16 / 32-bit integer or float array, scaled by its value range (module docstring)."""
    is_float = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float64, copy=False)
    if values.size == 0:
        return values.astype(np.uint8)
    if not np.isfinite(values).all():
        raise UnsupportedPixelValuesError(f"{path}: the image has NaN / inf pixel values")
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise UnsupportedPixelValuesError(
            f"{path}: pixel values range {low:g}..{high:g}; negative values cannot be mapped to 0..255")
    if is_float and high <= 1.0:
        scale = 255.0
    elif high <= 255:
        scale = 1.0
    elif high <= 65535:
        scale = 255.0 / 65535.0
    else:
        raise UnsupportedPixelValuesError(
            f"{path}: pixel values range {low:g}..{high:g}; only 0..1 (float), 0..255 and 0..65535 are understood")
    return np.round(values * scale).clip(0, 255).astype(np.uint8)


def load_rgb(path: str | Path, max_pixels: int | None = None) -> torch.Tensor:
    """Decode a PIL-readable image to ``(3, H, W)`` uint8 RGB with the EXIF orientation applied.

    Raises:
        ImageTooLargeError: more than ``max_pixels`` pixels (None: PIL's decompression-bomb limit).
        UnsupportedPixelValuesError: a wide / float image whose values have no unambiguous 0..255 mapping.
        OSError / ValueError / SyntaxError: what PIL raises for broken or non-image files.
    """
    with open_image(path, max_pixels) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in WIDE_MODES:
            image = Image.fromarray(wide_to_uint8(np.asarray(image), path))
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (0, 0, 0, 255))
            image = Image.alpha_composite(background, image)
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
