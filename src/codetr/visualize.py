"""Drawing detections on images (PIL ``ImageDraw`` with its scalable default font) and saving them as PNG.

torchvision's ``draw_bounding_boxes`` only scales its font with a TrueType file path, which a fresh machine may
not have; PIL bundles a scalable font (``ImageFont.load_default(size)``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.io import write_png

# A fixed, readable palette; class k uses colour k mod len(PALETTE).
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def line_and_font_size(height: int, width: int) -> tuple[int, int]:
    """Box line width and label font size (px) that stay readable at any image size: 2 px / 12 px up to a
    ~640 px long side, then growing with it (a 4000 px photo gets 12 px lines and 89 px labels)."""
    long_side = max(height, width)
    return max(2, round(long_side / 320)), max(12, round(long_side / 45))


def _text_colour(background: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    width: int | None = None,
    font_size: int | None = None,
    masks: Tensor | None = None,
    mask_alpha: float = 0.45,
) -> Tensor:
    """Boxes (and instance masks) on a uint8 ``(3, H, W)`` image. ``boxes`` ``(N, 4)`` xyxy in that image's pixels,
    ``masks`` ``(N, H, W)`` bool (a translucent fill of ``mask_alpha`` and a solid outline in the class colour, under
    the boxes), ``labels`` ``(N,)`` contiguous class indices, ``scores`` ``(N,)`` (detections below
    ``score_threshold`` are not drawn; ground truth passes ``scores=None``). Each label ("name score") sits on a
    filled box of its class colour above the box (inside it at the top edge); line width and font size scale with the
    image (:func:`line_and_font_size`) unless given.
    Returns a new uint8 ``(3, H, W)`` tensor."""
    if image.dtype != torch.uint8:
        raise TypeError(f"draw_detections expects a uint8 image, got {image.dtype}")
    boxes, labels = boxes.detach().cpu().float(), labels.detach().cpu().long()
    keep = torch.ones(len(boxes), dtype=torch.bool)
    if scores is not None:
        scores = scores.detach().cpu().float()
        keep = scores >= score_threshold
    boxes, labels = boxes[keep], labels[keep]
    if not len(boxes):
        return image.clone()
    height, width_img = image.shape[-2:]
    auto_width, auto_font = line_and_font_size(height, width_img)
    width, font_size = width or auto_width, font_size or auto_font
    if masks is not None:
        image = draw_masks(image, masks.detach().cpu()[keep], labels, mask_alpha, max(1, width // 2))
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width_img - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    names = [class_names[k] if class_names is not None and k < len(class_names) else str(k) for k in labels.tolist()]
    if scores is not None:
        names = [f"{name} {score:.2f}" for name, score in zip(names, scores[keep].tolist())]
    canvas = Image.fromarray(image.permute(1, 2, 0).cpu().numpy())
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=font_size)
    for box, label, text in zip(boxes.tolist(), labels.tolist(), names):
        colour = PALETTE[label % len(PALETTE)]
        draw.rectangle(box, outline=colour, width=width)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        pad = max(1, font_size // 6)
        text_w, text_h = right - left + 2 * pad, bottom - top + 2 * pad
        x = min(max(box[0], 0), max(width_img - text_w, 0))
        y = box[1] - text_h if box[1] - text_h >= 0 else box[1]  # above the box, or inside when at the top edge
        draw.rectangle((x, y, x + text_w, y + text_h), fill=colour)
        draw.text((x + pad - left, y + pad - top), text, fill=_text_colour(colour), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1).contiguous()


def mask_outlines(masks: Tensor, thickness: int = 1) -> Tensor:
    """``(N, H, W)`` bool -> the pixels of each mask within ``thickness`` px of its border (mask minus its erosion)."""
    if not len(masks):
        return masks.clone()
    size = 2 * thickness + 1
    inside = masks.float().unsqueeze(1)
    eroded = -torch.nn.functional.max_pool2d(-inside, size, stride=1, padding=thickness)  # min-pool: erosion
    return (inside - eroded).squeeze(1) > 0


def draw_masks(image: Tensor, masks: Tensor, labels: Tensor, alpha: float = 0.45, thickness: int = 1) -> Tensor:
    """Instance masks ``(N, H, W)`` bool on a uint8 ``(3, H, W)`` image: each filled with its class colour at
    ``alpha`` (torchvision's ``draw_segmentation_masks``) and outlined in it, later masks over earlier ones."""
    from torchvision.utils import draw_segmentation_masks

    if not len(masks):
        return image.clone()
    if masks.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"masks of size {tuple(masks.shape[-2:])} do not fit the {tuple(image.shape[-2:])} image")
    colours = [PALETTE[int(k) % len(PALETTE)] for k in labels.tolist()]
    filled = draw_segmentation_masks(image, masks.bool(), alpha=alpha, colors=colours)
    return draw_segmentation_masks(filled, mask_outlines(masks.bool(), thickness), alpha=1.0, colors=colours)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 ``(3, H, W)`` tensor as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.cpu(), str(path))
    return path
