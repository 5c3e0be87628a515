"""Box helpers shared by the DETR side and the auxiliary heads.

Formats used across codetr:

* ``xyxy``: ``(x1, y1, x2, y2)`` absolute pixels of the network input (resized image frame);
* ``cxcywh``: ``(cx, cy, w, h)`` normalised to ``[0, 1]`` by the image size ``(w, h)``.

torchvision.ops provides the conversions and pairwise IoU/GIoU; this module adds what it lacks:
the clamped logit (``inverse_sigmoid``), element-wise (aligned) IoU and normalisation helpers.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_convert


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Logit of ``x`` clamped to ``[0, 1]``: ``log(max(x, eps) / max(1 - x, eps))``.

    The reference uses ``eps=1e-3`` for box refinement and denoising queries and ``1e-5`` elsewhere.
    """
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """``(..., 4)`` cxcywh -> xyxy (any units)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """``(..., 4)`` xyxy -> cxcywh (any units)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def size_factors(image_sizes: Tensor) -> Tensor:
    """``(B, 2)`` valid ``(h, w)`` -> ``(B, 4)`` factors ``(w, h, w, h)`` for xyxy / cxcywh scaling."""
    h, w = image_sizes.unbind(-1)
    return torch.stack([w, h, w, h], dim=-1).to(torch.get_default_dtype())


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of corresponding rows of two ``(N, 4)`` xyxy tensors -> ``(N,)``.

    ``torchvision.ops.box_iou`` is pairwise (N x M); the losses need the diagonal only.
    """
    lt = torch.maximum(boxes1[:, :2], boxes2[:, :2])
    rb = torch.minimum(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).prod(dim=-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).prod(dim=-1)
    union = (area1 + area2 - inter).clamp(min=eps)
    return inter / union
