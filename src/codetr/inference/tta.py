"""Test-time augmentation: the views (test-size scales x horizontal flip) and how their detections are merged.

The official code has no TTA. Here every view runs the normal inference (test pipeline at ``scale`` times the test
size, optionally on the mirrored image); its detections are mapped back to the original image (flip undone) and the
views are merged per image by

* ``wbf``: weighted box fusion (after Solovyev et al. 2021): detections of one class are clustered greedily by
  score (IoU with the cluster's fused box above ``iou_threshold``); a cluster's box is the score-weighted mean of
  its boxes, its score the mean over views of each view's best score in it (a view that did not find the object
  adds 0). The paper's mean over all members would let the many low-score duplicates of a DETR's 300 detections
  drag a well-found object down;
* ``soft_nms``: the class-aware linear soft-NMS of the main head's post-processing over all views' detections.

Detections below ``min_score`` are dropped first (they cannot change a merged score much and cost time); both
keep the best ``max_per_image``.

Instance masks (``masks`` ``(N, H, W)`` bool in the original frame, ``mask_scores``) follow their boxes: a WBF
cluster's mask is the score-weighted vote of its members' masks (a pixel is in when members holding at least half
of the cluster's score weight have it: the box rule applied per pixel), its mask score the mean over views of each
view's best mask score; soft-NMS keeps each surviving detection's own mask, its mask score decayed by the factor
its box score was.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from codetr.models.postprocess import soft_nms

MERGES = ("wbf", "soft_nms")


@dataclass(frozen=True)
class TTAConfig:
    """``scales``: factors of the recipe's test size (1.0 = the normal one); ``flip``: add the mirrored view of
    every scale; ``merge``: ``wbf`` or ``soft_nms``; ``iou_threshold``: WBF clustering / soft-NMS IoU."""

    scales: tuple[float, ...] = (1.0,)
    flip: bool = True
    merge: str = "wbf"
    iou_threshold: float = 0.55
    min_score: float = 1e-3
    max_per_image: int = 300

    def __post_init__(self) -> None:
        if self.merge not in MERGES:
            raise ValueError(f"tta.merge must be one of {', '.join(MERGES)}, got {self.merge!r}")
        if not self.scales or any(float(s) <= 0 for s in self.scales):
            raise ValueError(f"tta.scales must be positive factors of the test size, got {list(self.scales)}")
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"tta.iou_threshold must be in (0, 1], got {self.iou_threshold}")

    @classmethod
    def from_mapping(cls, node: Mapping[str, Any] | None) -> TTAConfig | None:
        """From a config node (``tta=flip`` ...); None / empty -> no TTA. Unknown keys are refused."""
        if not node:
            return None
        node = dict(node)
        unknown = sorted(set(node) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown tta keys {unknown}; valid: {sorted(cls.__dataclass_fields__)}")
        if "scales" in node:
            node["scales"] = tuple(float(s) for s in node["scales"])
        return cls(**node)

    def views(self) -> list[tuple[float, bool]]:
        """``(scale, flipped)`` pairs in run order."""
        return [(float(s), flipped) for s in self.scales for flipped in ((False, True) if self.flip else (False,))]


def unflip(boxes: Tensor, width: float) -> Tensor:
    """``(N, 4)`` xyxy boxes of a mirrored image of ``width`` px -> the same boxes in the unmirrored image."""
    return torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1)


def _iou_one_to_many(box: Tensor, boxes: Tensor) -> Tensor:
    lt = torch.maximum(box[:2], boxes[:, :2])
    rb = torch.minimum(box[2:], boxes[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = (box[2:] - box[:2]).clamp(min=0).prod()
    areas = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0).prod(1)
    return inter / (area + areas - inter).clamp(min=1e-9)


def weighted_box_fusion(
    boxes: Tensor, scores: Tensor, labels: Tensor, views: Tensor, num_views: int, iou_threshold: float = 0.55,
    return_members: bool = False,
) -> tuple[Tensor, ...]:
    """Fuse ``(N, 4)`` xyxy boxes of all views with their ``(N,)`` scores, labels and view indices (``0..V-1``);
    see the module doc. Returns fused boxes ``(M, 4)``, scores ``(M,)`` (descending) and labels ``(M,)``; with
    ``return_members`` also ``(N,)`` the output cluster of every input detection (input order)."""
    order = scores.argsort(descending=True)
    boxes, scores, labels, views = boxes[order].float(), scores[order].float(), labels[order], views[order]
    weighted = boxes.new_zeros(len(boxes), 4)  # sum of score * box per cluster
    weight = scores.new_zeros(len(boxes))
    best = scores.new_zeros(len(boxes), num_views)  # each view's best score per cluster
    fused = boxes.new_zeros(len(boxes), 4)
    cluster_label = labels.new_full((len(boxes),), -1)
    cluster_of = torch.full((len(boxes),), -1, dtype=torch.long)  # per sorted detection
    clusters = 0
    for index, (box, score, label, view) in enumerate(zip(boxes, scores, labels, views.tolist())):
        target = -1
        if clusters:
            ious = _iou_one_to_many(box, fused[:clusters])
            ious = torch.where(cluster_label[:clusters] == label, ious, torch.full_like(ious, -1.0))
            nearest = int(ious.argmax())
            if float(ious[nearest]) > iou_threshold:
                target = nearest
        if target < 0:
            target, clusters = clusters, clusters + 1
            cluster_label[target] = label
        cluster_of[index] = target
        weighted[target] += score * box
        weight[target] += score
        best[target, view] = torch.maximum(best[target, view], score)
        fused[target] = weighted[target] / weight[target]
    fused_scores = best[:clusters].mean(1)
    output = fused_scores.argsort(descending=True)
    result = (fused[:clusters][output], fused_scores[output], cluster_label[:clusters][output])
    if not return_members:
        return result
    rank = torch.empty(clusters, dtype=torch.long)
    rank[output] = torch.arange(clusters)
    members = torch.empty(len(boxes), dtype=torch.long)
    members[order] = rank[cluster_of]
    return (*result, members)


def fuse_masks(masks: Tensor, scores: Tensor, members: Tensor, num_clusters: int) -> Tensor:
    """Score-weighted vote of ``(N, H, W)`` bool masks into ``num_clusters`` masks (``members``: each mask's cluster,
    ``-1`` or ``>= num_clusters`` = not needed): a pixel is in when its members' scores there reach half the cluster's
    total score. Returns ``(num_clusters, H, W)`` bool."""
    out = torch.zeros((num_clusters, *masks.shape[-2:]), dtype=torch.bool)
    for cluster in range(num_clusters):
        rows = torch.nonzero(members == cluster).view(-1)
        if len(rows) == 1:
            out[cluster] = masks[rows[0]]
        elif len(rows):
            weights = scores[rows].float()
            votes = (masks[rows].float() * weights[:, None, None]).sum(0)
            out[cluster] = votes >= 0.5 * weights.sum()
    return out


def merge_views(views: Sequence[dict[str, Tensor]], config: TTAConfig) -> dict[str, Tensor]:
    """One image's detections from every view (``boxes`` xyxy original pixels, ``scores``, ``labels``; optionally
    ``masks`` and ``mask_scores``) -> one set (module doc)."""
    keys = [k for k in ("boxes", "scores", "labels", "masks", "mask_scores") if all(k in v for v in views)]
    found = {k: torch.cat([v[k] for v in views]) for k in keys}
    found["boxes"], found["scores"] = found["boxes"].float(), found["scores"].float()
    view_index = torch.cat([torch.full((len(v["scores"]),), i, dtype=torch.long) for i, v in enumerate(views)])
    kept = found["scores"] >= config.min_score
    found, view_index = {k: v[kept] for k, v in found.items()}, view_index[kept]
    top = config.max_per_image
    if config.merge == "wbf":
        boxes, scores, labels, members = weighted_box_fusion(found["boxes"], found["scores"], found["labels"],
                                                             view_index, len(views), config.iou_threshold, True)
        out = {"boxes": boxes[:top], "scores": scores[:top], "labels": labels[:top]}
        if "masks" in found:
            out["masks"] = fuse_masks(found["masks"], found["scores"], members, len(out["scores"]))
        if "mask_scores" in found:
            best = torch.zeros(len(scores), len(views))
            for score, cluster, view in zip(found["mask_scores"].float().tolist(), members.tolist(),
                                            view_index.tolist()):
                best[cluster, view] = max(float(best[cluster, view]), score)
            out["mask_scores"] = best.mean(1)[:top]
        return out
    keep, scores = soft_nms(found["boxes"], found["scores"], found["labels"], config.iou_threshold, config.min_score)
    out = {"boxes": found["boxes"][keep][:top], "scores": scores[:top], "labels": found["labels"][keep][:top]}
    if "masks" in found:
        out["masks"] = found["masks"][keep][:top]
    if "mask_scores" in found:  # decayed by the factor soft-NMS decayed the box score
        decay = scores / found["scores"][keep].clamp(min=1e-12)
        out["mask_scores"] = (found["mask_scores"][keep].float() * decay)[:top]
    return out
