"""Main-head post-processing: flattened top-k over queries x classes, boxes to input pixels, optional
class-aware linear soft-NMS (spec 7). torchvision has hard NMS only, so soft-NMS is written here."""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

from codetr.models.box_ops import cxcywh_to_xyxy


def soft_nms(
    boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float = 0.8, min_score: float = 1e-3
) -> tuple[Tensor, Tensor]:
    """Class-aware linear soft-NMS.

    Repeatedly takes the highest-scoring box; every remaining box of the same label overlapping it by more
    than ``iou_threshold`` has its score multiplied by ``1 - IoU``; boxes whose score drops below ``min_score``
    are removed. Returns ``(keep, new_scores)``: indices in selection order and their decayed scores.
    """
    scores = scores.clone()
    alive = torch.ones_like(scores, dtype=torch.bool)
    ious = box_iou(boxes, boxes)
    same_label = labels[:, None] == labels[None, :]
    keep, kept_scores = [], []
    alive &= scores >= min_score
    while bool(alive.any()):
        masked = torch.where(alive, scores, torch.full_like(scores, -1.0))
        best = int(masked.argmax())
        keep.append(best)
        kept_scores.append(scores[best])
        alive[best] = False
        overlap = ious[best]
        decay = (overlap > iou_threshold) & same_label[best] & alive
        scores = torch.where(decay, scores * (1 - overlap), scores)
        alive &= scores >= min_score
    if not keep:
        return torch.empty(0, dtype=torch.long, device=boxes.device), scores.new_empty(0)
    return torch.tensor(keep, dtype=torch.long, device=boxes.device), torch.stack(kept_scores)


def postprocess(
    logits: Tensor,
    boxes: Tensor,
    image_sizes: Tensor,
    max_per_image: int = 300,
    soft_nms_iou: float | None = 0.8,
    soft_nms_min_score: float = 1e-3,
    candidates_before_nms: int | None = None,
) -> list[dict[str, Tensor]]:
    """Detections from the last decoder layer.

    Args:
        logits ``(B, Q, K)``; boxes ``(B, Q, 4)`` normalised cxcywh; image_sizes ``(B, 2)`` (h, w).
        soft_nms_iou: None = the NMS-free top-k of the paper.
        candidates_before_nms: how many top scores enter soft-NMS (mmdet-3 port: ``max_per_image``, the default;
            original Co-DETR: the number of queries, 900); the output is cut to ``max_per_image`` afterwards.

    Returns:
        per image ``{boxes (N, 4) xyxy input pixels clamped to the image, scores (N,), labels (N,)}``.
    """
    num_classes = logits.shape[-1]
    results = []
    use_nms = soft_nms_iou is not None
    candidates = (candidates_before_nms or max_per_image) if use_nms else max_per_image
    for image in range(logits.shape[0]):
        scores, index = logits[image].sigmoid().flatten().topk(min(candidates, logits[image].numel()))
        labels = index % num_classes
        picked = cxcywh_to_xyxy(boxes[image][index // num_classes])
        h, w = image_sizes[image].to(picked.dtype)
        picked = picked * torch.stack([w, h, w, h])
        picked = torch.stack(
            [picked[:, 0].clamp(0, w), picked[:, 1].clamp(0, h), picked[:, 2].clamp(0, w), picked[:, 3].clamp(0, h)], 1
        )
        if use_nms and len(picked):
            # the greedy loop reads a scalar per iteration: run it on a CPU copy (one transfer, no per-step syncs)
            keep, scores = soft_nms(picked.cpu(), scores.cpu(), labels.cpu(), soft_nms_iou, soft_nms_min_score)
            keep, scores = keep.to(picked.device), scores.to(picked.device)
            picked, labels = picked[keep], labels[keep]
            scores, picked, labels = scores[:max_per_image], picked[:max_per_image], labels[:max_per_image]
        results.append({"boxes": picked, "scores": scores, "labels": labels})
    return results
