"""Mask geometry of the mask branch (docs/architecture.md#mask-branch): training targets cropped from the ground-truth
masks, the area ratios of the mask-IoU targets, the boundary band of a binary mask, the stage-by-stage refinement at
inference and the paste of RoI masks into the image.

Masks are binary ``(N, H, W)`` tensors on one canvas per image (the padded image the boxes live in); boxes are xyxy
pixels on that canvas. Written to the reference's arithmetic (mmdet ``BitmapMasks.crop_and_resize`` / ``crop``,
``generate_block_target``, ``_do_paste_mask``), which no library reproduces; the RoI sampling is
``torchvision.ops.roi_align``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import roi_align


def crop_and_resize(masks: Tensor, boxes: Tensor, indices: Tensor, size: int) -> Tensor:
    """``(N, size, size)`` binary float targets: mask ``indices[n]`` of ``masks`` ``(G, H, W)`` sampled in box ``n``
    (``(N, 4)`` xyxy, clipped to the canvas) with aligned RoIAlign, thresholded at 0.5."""
    if len(boxes) == 0 or len(masks) == 0:
        return masks.new_zeros((0, size, size), dtype=torch.float32)
    height, width = masks.shape[-2:]
    clipped = torch.stack([boxes[:, 0].clamp(0, width), boxes[:, 1].clamp(0, height),
                           boxes[:, 2].clamp(0, width), boxes[:, 3].clamp(0, height)], dim=1).float()
    rois = torch.cat([indices.to(clipped).unsqueeze(1), clipped], dim=1)
    sampled = roi_align(masks.float().unsqueeze(1), rois, size, 1.0, 0, aligned=True).squeeze(1)
    return (sampled >= 0.5).float()


def area_ratios(masks: Tensor, boxes: Tensor, indices: Tensor) -> Tensor:
    """Per box: the assigned mask's area inside the box (box coordinates truncated to integers, clipped, at least one
    pixel wide and high, as ``BitmapMasks.crop``) over the mask's whole area (+1e-7). ``(N,)`` float32."""
    if len(boxes) == 0:
        return boxes.new_zeros(0, dtype=torch.float32)
    height, width = masks.shape[-2:]
    integral = F.pad(masks.to(torch.int64).cumsum(1).cumsum(2), (1, 0, 1, 0))  # (G, H + 1, W + 1)
    box = boxes.to(torch.float32).trunc().to(torch.int64)
    x1, x2 = box[:, 0].clamp(0, width), box[:, 2].clamp(0, width)
    y1, y2 = box[:, 1].clamp(0, height), box[:, 3].clamp(0, height)
    x2 = torch.minimum(x1 + (x2 - x1).clamp(min=1), torch.full_like(x2, width))
    y2 = torch.minimum(y1 + (y2 - y1).clamp(min=1), torch.full_like(y2, height))
    table = integral[indices]
    rows = torch.arange(len(boxes), device=boxes.device)
    inside = table[rows, y2, x2] - table[rows, y1, x2] - table[rows, y2, x1] + table[rows, y1, x1]
    whole = integral[indices, -1, -1]
    return inside.to(torch.float32) / (whole.to(torch.float32) + 1e-7)


def boundary_band(masks: Tensor, width: int) -> Tensor:
    """``(N, H, W)`` binary masks -> ``(N, H, W)`` int64 labels: 1 on the band of ``width`` pixels on both sides of
    each mask's boundary, 2 inside the mask beyond it, 0 elsewhere (``generate_block_target``)."""
    target = masks.float()
    size = 2 * width + 1
    kernel = -torch.ones(1, 1, size, size, dtype=torch.float32, device=masks.device)
    kernel[0, 0, width, width] = size * size - 1
    padded = F.pad(target.unsqueeze(1), (width, width, width, width), "constant", 0)

    def edge(x: Tensor) -> Tensor:
        response = F.conv2d(x, kernel).clamp(min=0) / float(size * size)
        return (response > 0.1).float().squeeze(1)

    positive, negative = edge(padded), edge(1 - padded)
    block = torch.where((positive + negative) > 0, 1, 0)  # where, not masked assignment: exportable
    return torch.where((target - positive) > 0, 2, block).long()


def refine_stages(stage_logits: list[Tensor]) -> Tensor:
    """Inference refinement from stage 1 on: at every next stage, pixels outside the previous stage's boundary band
    (width 1, at its binary 0.5 threshold) take the previous stage's logits bilinearly upsampled. Returns the final
    ``(R, 1, S, S)`` logits (the inputs are not modified)."""
    logits = list(stage_logits[1:])
    for index in range(len(logits) - 1):
        binary = logits[index].squeeze(1).sigmoid() >= 0.5
        size = logits[index + 1].shape[-2:]
        outside = (boundary_band(binary, 1) != 1).unsqueeze(1).float()
        outside = F.interpolate(outside, size, mode="bilinear", align_corners=True) >= 0.5
        previous = F.interpolate(logits[index], size, mode="bilinear", align_corners=True)
        logits[index + 1] = torch.where(outside, previous, logits[index + 1])
    return logits[-1]


def paste_masks(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> Tensor:
    """RoI mask probabilities ``(N, S, S)`` pasted into a ``height x width`` image at xyxy ``boxes`` ``(N, 4)``:
    bilinear sampling at pixel centres, only within each box's rounded-out extent (one pixel margin), binarised at
    ``threshold`` -> ``(N, height, width)`` bool. One box at a time (the reference's CPU path), so the memory is one
    box's region."""
    out = torch.zeros((len(probs), height, width), dtype=torch.bool, device=probs.device)
    for n in range(len(probs)):
        box = boxes[n].float()
        x0 = int(max(float(torch.floor(box[0]) - 1), 0))
        y0 = int(max(float(torch.floor(box[1]) - 1), 0))
        x1 = int(min(float(torch.ceil(box[2]) + 1), width))
        y1 = int(min(float(torch.ceil(box[3]) + 1), height))
        if x1 <= x0 or y1 <= y0:
            continue
        ys = torch.arange(y0, y1, device=probs.device, dtype=torch.float32) + 0.5
        xs = torch.arange(x0, x1, device=probs.device, dtype=torch.float32) + 0.5
        ys = (ys - box[1]) / (box[3] - box[1]) * 2 - 1
        xs = (xs - box[0]) / (box[2] - box[0]) * 2 - 1
        ys = torch.where(torch.isinf(ys), torch.zeros_like(ys), ys)  # a zero-height box: the reference's guard
        xs = torch.where(torch.isinf(xs), torch.zeros_like(xs), xs)
        grid = torch.stack([xs[None, :].expand(len(ys), -1), ys[:, None].expand(-1, len(xs))], dim=-1)
        sampled = F.grid_sample(probs[n][None, None].float(), grid[None], align_corners=False)[0, 0]
        out[n, y0:y1, x0:x1] = sampled >= threshold
    return out
