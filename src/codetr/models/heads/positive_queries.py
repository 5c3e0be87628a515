"""Co-DETR's customised positive queries: turn an auxiliary head's positive boxes into decoder queries and
one-to-one targets (docs/architecture.md#positive-queries). Written by hand: Co-DETR-specific.

Randomness (which positives to keep when there are too many, which negatives pad the rest) is drawn with
``torch.randperm`` on the CPU default generator, image by image, as the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from codetr.models.box_ops import xyxy_to_cxcywh


@dataclass
class PositiveQueryTargets:
    """boxes ``(B, M, 4)`` normalised cxcywh (query reference boxes); labels ``(B, M)`` (K = background);
    targets ``(B, M, 4)`` normalised cxcywh; label_weights ``(B, M)``; box_weights ``(B, M, 4)``;
    features ``(B, M, C)`` the chosen candidates' features (only when candidate features were given)."""

    boxes: Tensor
    labels: Tensor
    targets: Tensor
    label_weights: Tensor
    box_weights: Tensor
    features: Tensor | None = None


def build_positive_queries(
    coords: list[Tensor],
    labels: list[Tensor],
    targets: list[Tensor],
    image_sizes: Tensor,
    num_classes: int,
    max_queries: int = 300,
    min_queries: int = 9,
    features: list[Tensor] | None = None,
) -> PositiveQueryTargets:
    """Select ``M = max(min_queries, min(max_queries, most positives in an image))`` candidates per image.

    Args:
        coords / labels / targets: per image ``(N_i, 4)`` xyxy absolute candidate boxes, ``(N_i,)`` labels
            (``num_classes`` = negative), ``(N_i, 4)`` xyxy absolute assigned GT boxes (zeros for negatives).
        image_sizes: ``(B, 2)`` (h, w) used for normalisation.
        features: optional per image ``(N_i, C)`` candidate features, selected like the boxes (zeros for padding).

    Every image keeps (a random subset of at most M of) its positives and is filled up to M with randomly chosen
    negative candidates of the same image; those are trained as background. An image with fewer than M candidates
    in all is padded with empty background boxes (never happens with real anchors / RoIs; keeps odd inputs alive).
    """
    batch = len(coords)
    device = coords[0].device
    # One device -> host transfer for every count this function needs (the number of queries M
    # shapes the output); the index lists are then taken with known sizes, which costs no further sync.
    pos_masks = [(lab >= 0) & (lab < num_classes) for lab in labels]
    neg_masks = [lab == num_classes for lab in labels]
    counts = torch.stack([torch.stack([p.sum(), n.sum()]) for p, n in zip(pos_masks, neg_masks)])
    host = counts.flatten().tolist()
    num_pos, num_neg = host[0::2], host[1::2]
    count = max(min_queries, min(max_queries, max(num_pos, default=0)))
    out_boxes, out_labels, out_targets, out_features = [], [], [], []
    box_weights = torch.zeros(batch, count, 4, device=device)
    for image in range(batch):
        pos = torch.nonzero_static(pos_masks[image], size=num_pos[image]).squeeze(1)
        neg = torch.nonzero_static(neg_masks[image], size=num_neg[image]).squeeze(1)
        if len(pos) > count:
            pos = pos[torch.randperm(len(pos))[:count].to(device)]
        keep = pos
        box_weights[image, : len(pos)] = 1.0
        if len(pos) < count:
            pad = neg[torch.randperm(len(neg))[: count - len(pos)].to(device)]
            keep = torch.cat([pos, pad])
        factor = image_sizes[image].flip(0).repeat(2).to(coords[image].dtype)  # (w, h, w, h), stays on the device
        missing = count - len(keep)  # only when an image has too few candidates at all: pad with empty boxes
        out_boxes.append(F.pad(xyxy_to_cxcywh(coords[image][keep] / factor), (0, 0, 0, missing)))
        out_labels.append(F.pad(labels[image][keep], (0, missing), value=num_classes))
        out_targets.append(F.pad(xyxy_to_cxcywh(targets[image][keep] / factor), (0, 0, 0, missing)))
        if features is not None:
            out_features.append(F.pad(features[image][keep], (0, 0, 0, missing)))
    return PositiveQueryTargets(
        torch.stack(out_boxes),
        torch.stack(out_labels),
        torch.stack(out_targets),
        torch.ones(batch, count, device=device),
        box_weights,
        torch.stack(out_features) if features is not None else None,
    )
