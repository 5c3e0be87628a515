"""Values that several parts of the detector must agree on, checked once when :class:`CoDETR` is built.

The recipes derive them (``conf/model/co_dino.yaml``); parts built by hand, or a config that overrides one side
only, could still disagree and fail deep inside a forward pass (or, for positive queries, train projections that
no branch feeds, which DDP refuses). The rules:

* feature levels: the transformer reads ``num_levels`` maps, which the neck produces (``num_outs``). The query
  head's auxiliary pyramid adds one stride-2 level (``downsample`` of the last map), so the dense auxiliary heads
  (RPN, ATSS) have ``num_levels + 1`` strides and the RoI heads the first ``num_levels``; all heads name the same
  stride for the same level, and the added level's stride is twice the one before.
* positive-query branches: the transformer has one ``aux_pos_trans`` projection per auxiliary head that returns
  positives (every RoI head and every ``bbox_head``) when ``use_positive_queries`` is on, and none when it is off.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def positive_query_branches(num_roi_heads: int, num_bbox_heads: int, use_positive_queries: bool) -> int:
    """Number of auxiliary branches whose positives become extra decoder query groups."""
    return num_roi_heads + num_bbox_heads if use_positive_queries else 0


def _head_strides(head: nn.Module) -> list[int] | None:
    generator = getattr(head, "anchor_generator", None)
    strides = generator.strides if generator is not None else getattr(head, "strides", None)
    return [int(s) for s in strides] if strides is not None else None


def _neck_levels(neck: nn.Module) -> int | None:
    if getattr(neck, "num_outs", None) is not None:
        return int(neck.num_outs)
    channels = getattr(neck, "out_channels", None)
    return len(channels) if isinstance(channels, Sequence) else None


def check_feature_levels(
    neck: nn.Module, num_levels: int, rpn_head: nn.Module | None, roi_heads: Sequence[nn.Module],
    bbox_heads: Sequence[nn.Module],
) -> None:
    """Raises ``ValueError`` naming both values when the neck or a head disagrees with ``num_levels``."""
    neck_levels = _neck_levels(neck)
    if neck_levels is not None and neck_levels != num_levels:
        raise ValueError(
            f"the neck ({type(neck).__name__}) gives {neck_levels} feature levels (num_outs) but the transformer reads "
            f"num_levels={num_levels}; make them equal (the recipes set transformer.num_levels from neck.num_outs)"
        )
    dense = ([("rpn_head", rpn_head)] if rpn_head is not None else []) + [
        (f"bbox_head[{i}]", head) for i, head in enumerate(bbox_heads)
    ]
    reference: tuple[str, list[int]] | None = None
    for name, head in dense + [(f"roi_head[{i}]", head) for i, head in enumerate(roi_heads)]:
        strides = _head_strides(head)
        if strides is None:
            continue
        expected = num_levels + 1 if not name.startswith("roi_head") else num_levels
        if len(strides) != expected:
            what = ("the auxiliary pyramid's num_levels + 1" if expected == num_levels + 1
                    else "the auxiliary pyramid's first num_levels")
            raise ValueError(
                f"{name} has {len(strides)} strides {strides} but {what} = {expected} levels feed it "
                f"(transformer num_levels={num_levels})"
            )
        if reference is not None:
            other_name, other = reference
            common = min(len(other), len(strides))
            if other[:common] != strides[:common]:
                raise ValueError(f"{name} strides {strides} disagree with {other_name} strides {other} on the same "
                                 "pyramid levels")
        if len(strides) == num_levels + 1 and num_levels >= 1 and strides[-1] != 2 * strides[-2]:
            raise ValueError(f"{name} strides {strides}: the last level is the stride-2 downsample of the one before, "
                             f"so its stride must be {2 * strides[-2]}, not {strides[-1]}")
        if reference is None or len(strides) > len(reference[1]):
            reference = (name, strides)


def check_positive_query_branches(
    num_projections: int, roi_heads: Sequence[nn.Module], bbox_heads: Sequence[nn.Module], use_positive_queries: bool
) -> None:
    """Raises ``ValueError`` when the transformer's ``num_co_heads`` projections differ from the branches built."""
    expected = positive_query_branches(len(roi_heads), len(bbox_heads), use_positive_queries)
    if num_projections != expected:
        branches = (f"{len(roi_heads)} roi_head + {len(bbox_heads)} bbox_head" if use_positive_queries
                    else "use_positive_queries is off")
        raise ValueError(
            f"the transformer has num_co_heads={num_projections} positive-query projections (aux_pos_trans) but the "
            f"detector feeds {expected} branches ({branches}); set num_co_heads={expected} (the recipes derive it)"
        )
