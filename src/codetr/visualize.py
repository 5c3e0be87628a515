"""Drawing detections on images (torchvision.utils.draw_bounding_boxes) and saving them as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes

# A fixed, readable palette; class k uses colour k mod len(PALETTE).
PALETTE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40),
    (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128),
]


def draw_detections(
    image: Tensor,
    boxes: Tensor,
    labels: Tensor,
    scores: Tensor | None = None,
    class_names: Sequence[str] | None = None,
    score_threshold: float = 0.3,
    width: int = 2,
) -> Tensor:
    """Boxes on a uint8 ``(3, H, W)`` image. ``boxes`` ``(N, 4)`` xyxy in that image's pixels, ``labels`` ``(N,)``
    contiguous class indices, ``scores`` ``(N,)`` (detections below ``score_threshold`` are not drawn; ground truth
    passes ``scores=None``). Returns a new uint8 ``(3, H, W)`` tensor."""
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
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width_img - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height - 1)
    names = [class_names[k] if class_names is not None and k < len(class_names) else str(k) for k in labels.tolist()]
    if scores is not None:
        names = [f"{name} {score:.2f}" for name, score in zip(names, scores[keep].tolist())]
    colors = [PALETTE[k % len(PALETTE)] for k in labels.tolist()]
    return draw_bounding_boxes(image.cpu(), boxes, labels=names, colors=colors, width=width)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 ``(3, H, W)`` tensor as PNG (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(image.cpu(), str(path))
    return path
