"""Main-head post-processing, one part shared by evaluation, prediction and export (docs/architecture.md#postprocess).

:class:`PostProcessor` turns the last decoder layer's logits and boxes into detections:

* ``forward`` (evaluation / prediction): flattened top-k over queries x classes, boxes to input pixels, then the
  optional class-aware linear soft-NMS of the reference's test config; per image a dict of variable length;
* ``deploy`` (export): the same top-k without NMS (the reference's NMS-free test config) as fixed-shape batched
  tensors, written in ops that ``torch.export`` and ONNX take (no Python loop over images, no host reads).

torchvision has hard NMS only, so soft-NMS is written here (:func:`soft_nms`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
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


def top_k_detections(logits: Tensor, boxes: Tensor, image_sizes: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Top ``k`` (query, class) pairs of every image by sigmoid score, boxes in input pixels clamped to the image.

    Args:
        logits: ``(B, Q, K)``; boxes: ``(B, Q, 4)`` normalised cxcywh; image_sizes: ``(B, 2)`` (h, w).
        k: at most ``Q * K``.

    Returns:
        boxes ``(B, k, 4)`` xyxy input pixels, scores ``(B, k)`` descending, labels ``(B, k)`` int64.
    """
    num_classes = logits.shape[-1]
    scores, index = logits.sigmoid().flatten(1).topk(k, dim=1)
    labels = index % num_classes
    query = (index // num_classes).unsqueeze(-1).expand(-1, -1, 4)
    h, w = image_sizes.to(boxes.dtype).unbind(-1)
    factors = torch.stack([w, h, w, h], -1)[:, None]  # (B, 1, 4)
    picked = cxcywh_to_xyxy(boxes.gather(1, query)) * factors
    return torch.minimum(picked.clamp(min=0), factors), scores, labels


class PostProcessor(nn.Module):
    """Detections from the last decoder layer (no parameters).

    Args:
        max_per_image: detections kept per image (reference: COCO 300, LVIS / ViT-L 1000).
        soft_nms_iou: IoU above which soft-NMS decays a same-class box; None = the NMS-free top-k of the paper.
        soft_nms_min_score: boxes decayed below it are removed.
        candidates_before_nms: how many top scores enter soft-NMS (None = ``max_per_image``, the mmdet-3 port;
            the original Co-DETR uses the number of queries, 900); the output is cut to ``max_per_image``.
    """

    def __init__(
        self,
        max_per_image: int = 300,
        soft_nms_iou: float | None = 0.8,
        soft_nms_min_score: float = 1e-3,
        candidates_before_nms: int | None = None,
    ):
        super().__init__()
        if max_per_image < 1:
            raise ValueError(f"max_per_image must be >= 1, got {max_per_image}")
        self.max_per_image, self.soft_nms_iou = int(max_per_image), soft_nms_iou
        self.soft_nms_min_score, self.candidates_before_nms = soft_nms_min_score, candidates_before_nms

    def extra_repr(self) -> str:
        return f"max_per_image={self.max_per_image}, soft_nms_iou={self.soft_nms_iou}"

    def forward(self, logits: Tensor, boxes: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """``logits`` ``(B, Q, K)``, ``boxes`` ``(B, Q, 4)`` normalised cxcywh, ``image_sizes`` ``(B, 2)`` (h, w) ->
        per image ``{boxes (N, 4) xyxy input pixels clamped to the image, scores (N,), labels (N,)}``."""
        use_nms = self.soft_nms_iou is not None
        candidates = (self.candidates_before_nms or self.max_per_image) if use_nms else self.max_per_image
        picked, scores, labels = top_k_detections(logits, boxes, image_sizes, min(candidates, logits[0].numel()))
        results = []
        for image in range(logits.shape[0]):
            image_boxes, image_scores, image_labels = picked[image], scores[image], labels[image]
            if use_nms:
                # the greedy loop reads a scalar per iteration: run it on a CPU copy (one transfer, no per-step syncs)
                keep, image_scores = soft_nms(image_boxes.cpu(), image_scores.cpu(), image_labels.cpu(),
                                              self.soft_nms_iou, self.soft_nms_min_score)
                keep, image_scores = keep.to(picked.device)[: self.max_per_image], image_scores.to(picked.device)
                image_scores = image_scores[: self.max_per_image]
                image_boxes, image_labels = image_boxes[keep], image_labels[keep]
            results.append({"boxes": image_boxes, "scores": image_scores, "labels": image_labels})
        return results

    def deploy(self, logits: Tensor, boxes: Tensor, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Export mode: the NMS-free top ``max_per_image`` as batched tensors (boxes ``(B, M, 4)`` xyxy input
        pixels, scores ``(B, M)`` descending, labels ``(B, M)`` int64); shapes depend on no value."""
        return top_k_detections(logits, boxes, image_sizes, min(self.max_per_image, logits[0].numel()))


def postprocess(
    logits: Tensor,
    boxes: Tensor,
    image_sizes: Tensor,
    max_per_image: int = 300,
    soft_nms_iou: float | None = 0.8,
    soft_nms_min_score: float = 1e-3,
    candidates_before_nms: int | None = None,
) -> list[dict[str, Tensor]]:
    """:class:`PostProcessor` as a function (same arguments, same output)."""
    return PostProcessor(max_per_image, soft_nms_iou, soft_nms_min_score, candidates_before_nms)(
        logits, boxes, image_sizes
    )
