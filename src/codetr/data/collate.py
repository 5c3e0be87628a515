"""Batching: pad images to the batch maximum (bottom/right), keep per-image sizes, masks and targets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor


@dataclass
class DetectionBatch:
    """A collated batch.

    images ``(B, 3, H, W)`` uint8 (normalised on the device, :func:`normalize_images`); image_sizes ``(B, 2)`` int64
    ``(h, w)`` as the model sees them (LSJ: the canvas); padding_mask ``(B, H, W)`` bool, True = batch padding;
    targets: per image ``{"boxes": (N, 4) float32 xyxy input pixels, "labels": (N,) int64}`` (+ ``"masks"``
    ``(N, H_i, W_i)`` bool on the image padded to ``size_divisor``, with ``with_masks``); orig_sizes ``(B, 2)``
    ``(h, w)`` of the original images; scale_factors ``(B, 2)`` ``(w_scale, h_scale)`` with input = original x
    scale; image_ids ``(B,)`` int64 (dataset ids, for evaluation).
    """

    images: Tensor
    image_sizes: Tensor
    padding_mask: Tensor
    targets: list[dict[str, Tensor]]
    orig_sizes: Tensor
    scale_factors: Tensor
    image_ids: Tensor

    def to(self, device, non_blocking: bool = False) -> DetectionBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in moved.items():
            if isinstance(value, Tensor):
                moved[name] = value.to(device, non_blocking=non_blocking)
        moved["targets"] = [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets]
        return DetectionBatch(**moved)

    def __len__(self) -> int:
        return len(self.image_ids)


def collate(samples: Sequence[dict], size_divisor: int = 1, with_masks: bool = False) -> DetectionBatch:
    """Stack transformed samples; the padded size is rounded up to a multiple of ``size_divisor``. With
    ``with_masks`` each image's instance masks join its targets, padded bottom/right to the image's own size
    rounded up to ``size_divisor`` (the reference's per-image ``pad_shape``, on which mask targets are cropped)."""
    heights = [s["image"].shape[-2] for s in samples]
    widths = [s["image"].shape[-1] for s in samples]
    height = -(-max(heights) // size_divisor) * size_divisor
    width = -(-max(widths) // size_divisor) * size_divisor
    images = torch.zeros(len(samples), 3, height, width, dtype=torch.uint8)
    padding = torch.ones(len(samples), height, width, dtype=torch.bool)
    image_sizes, targets = [], []
    for i, sample in enumerate(samples):
        h, w = sample["image"].shape[-2:]
        images[i, :, :h, :w] = sample["image"].as_subclass(Tensor)
        size = sample.get("image_size", (h, w))
        padding[i, : size[0], : size[1]] = False
        image_sizes.append(list(size))
        boxes = sample.get("boxes")
        target = {
            "boxes": boxes.as_subclass(Tensor).float().reshape(-1, 4) if boxes is not None else torch.zeros(0, 4),
            "labels": sample.get("labels", torch.zeros(0, dtype=torch.long)).long(),
        }
        if with_masks:
            target["masks"] = _padded_masks(sample, len(target["boxes"]), h, w, size_divisor)
        targets.append(target)
    return DetectionBatch(
        images=images,
        image_sizes=torch.tensor(image_sizes, dtype=torch.long),
        padding_mask=padding,
        targets=targets,
        orig_sizes=torch.tensor([list(s["orig_size"]) for s in samples], dtype=torch.long),
        scale_factors=torch.tensor([list(s.get("scale_factor", (1.0, 1.0))) for s in samples], dtype=torch.float32),
        image_ids=torch.tensor([int(s["image_id"]) for s in samples], dtype=torch.long),
    )


def _padded_masks(sample: dict, count: int, height: int, width: int, size_divisor: int) -> Tensor:
    masks = sample.get("masks")
    pad_h, pad_w = -(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor
    out = torch.zeros(count, pad_h, pad_w, dtype=torch.bool)
    if masks is None:
        raise ValueError(f"image {sample.get('image_id')}: the batch needs instance masks but the sample has none "
                         "(the dataset was built without with_masks)")
    plain = masks.as_subclass(Tensor)
    if len(plain) != count:
        raise ValueError(f"image {sample.get('image_id')}: {len(plain)} masks for {count} boxes")
    out[:, : plain.shape[-2], : plain.shape[-1]] = plain.bool()
    return out


def normalize_images(images: Tensor, padding_mask: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> float ``(x - mean) / std`` with batch-padding pixels set to 0 (after normalisation,
    as the reference). LSJ canvases carry their 114 padding inside ``image_size``, so it is normalised like pixels."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    normalized = (images.float() - mean_t) / std_t
    return normalized.masked_fill(padding_mask[:, None], 0.0)
