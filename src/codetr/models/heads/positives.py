"""What an auxiliary head hands to the query head's customised positive queries
(docs/architecture.md#positive-queries, #atss, #roi-head)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass
class PositiveSet:
    """Per-image candidate boxes of an auxiliary head and their one-to-many assignment.

    coords: per image ``(N_i, 4)`` xyxy absolute pixels: the anchors (ATSS, all levels, all-zero boxes for
        anchors outside the valid image region) or the sampled RoIs (RoI head: positives first, GT boxes
        included when sampled).
    labels: per image ``(N_i,)`` int64 class of the assigned GT; ``K`` (num_classes) = negative.
    targets: per image ``(N_i, 4)`` xyxy absolute assigned GT box; zeros for negatives.
    features: computes, on demand, per image ``(N_i, C)`` a feature vector of every candidate: the
        auxiliary-pyramid vector at the anchor's location (ATSS) or the spatially averaged RoI feature (RoI head).
        Only query heads that feed candidate features into their queries call it (Co-Deformable-DETR), so
        Co-DINO never pays for it. Not detached: those queries train the features.
    """

    coords: list[Tensor]
    labels: list[Tensor]
    targets: list[Tensor]
    features: Callable[[], list[Tensor]] | None = None
