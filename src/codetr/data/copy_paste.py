"""Copy-Paste (Ghiasi et al.) on two LSJ samples of the same canvas size (docs/architecture.md#lsj), written by
hand: v2 has no multi-image transform. Without instance masks, each box is pasted as a filled rectangle
(box-only fallback)."""

from __future__ import annotations

import torch
from torchvision import tv_tensors

from codetr.data.transforms import drop_empty, mask_areas, masks_to_boxes_safe


def _masks_or_boxes(sample: dict) -> torch.Tensor:
    if "masks" in sample:
        return sample["masks"].as_subclass(torch.Tensor).bool()
    h, w = sample["image"].shape[-2:]
    masks = torch.zeros(len(sample["boxes"]), h, w, dtype=torch.bool)
    for i, (x1, y1, x2, y2) in enumerate(sample["boxes"].as_subclass(torch.Tensor).round().int().tolist()):
        masks[i, y1:y2, x1:x2] = True
    return masks


class CopyPaste:
    """Paste a random subset of ``src``'s objects onto ``dst``.

    Args:
        max_num_pasted: at most this many source objects (n ~ U{0..min(#src, max - 1)}).
        box_shift_threshold / min_area: a destination object survives if all four sides of its recomputed box moved
            by <= ``box_shift_threshold`` px, or more than ``min_area`` px of its mask stay visible.
    """

    def __init__(self, max_num_pasted: int = 100, box_shift_threshold: float = 10, min_area: int = 300):
        self.max_num_pasted, self.box_shift_threshold, self.min_area = max_num_pasted, box_shift_threshold, min_area

    def __call__(self, dst: dict, src: dict) -> dict:
        if len(src["boxes"]) == 0 or dst["image"].shape != src["image"].shape:
            return dst
        count = int(torch.randint(0, min(len(src["boxes"]), self.max_num_pasted - 1) + 1, ()).item())
        if count == 0:
            return dst
        chosen = torch.randperm(len(src["boxes"]))[:count]
        src_masks = _masks_or_boxes(src)[chosen]
        union = src_masks.view(torch.uint8).amax(0).bool()  # uint8 amax: much faster than bool any
        dst_masks = _masks_or_boxes(dst) & ~union
        dst_boxes = dst["boxes"].as_subclass(torch.Tensor)
        new_boxes = masks_to_boxes_safe(dst_masks)
        shift_ok = ((new_boxes - dst_boxes).abs() <= self.box_shift_threshold).all(1)
        keep = shift_ok | (mask_areas(dst_masks) > self.min_area)
        image = torch.where(union[None], src["image"].as_subclass(torch.Tensor), dst["image"].as_subclass(torch.Tensor))
        boxes = torch.cat([new_boxes[keep], masks_to_boxes_safe(src_masks)])
        out = dict(dst)
        out["image"] = tv_tensors.Image(image)
        out["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=tuple(image.shape[-2:]))
        out["labels"] = torch.cat([dst["labels"][keep], src["labels"][chosen]])
        if "masks" in dst:
            out["masks"] = tv_tensors.Mask(torch.cat([dst_masks[keep], src_masks]).to(torch.uint8))
        valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(valid.all()):  # a fully covered dst object kept by the shift rule has an empty box
            out = drop_empty(out, 0.0)
        return out
