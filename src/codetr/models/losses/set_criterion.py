"""Losses of the Co-DINO query head: Hungarian-matched per-layer and encoder losses, denoising losses and the
losses of Co-DETR's customised positive queries (docs/architecture.md#detr-losses).
All share one target-to-loss core."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from codetr.models.box_ops import aligned_iou, cxcywh_to_xyxy
from codetr.models.losses.losses import QualityFocalLoss, weighted_giou, weighted_l1
from codetr.models.losses.matcher import HungarianMatcher


def mean_over_ranks(value: Tensor) -> Tensor:
    """Average a scalar tensor over data-parallel ranks (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class SetCriterion:
    """Computes ``(loss_cls, loss_bbox, loss_iou)`` for one decoder layer's (or the encoder's) predictions.

    Classification: ``classification`` (default QFL with IoU quality targets and ``qfl_beta``, Co-DINO; the
    focal loss for Co-Deformable-DETR), normalised by the local number of positives (averaged over ranks when
    ``sync_cls_avg_factor``; the mmdet-3 port keeps it local, the original syncs it). L1 on normalised cxcywh and
    GIoU on absolute xyxy, normalised by the rank-mean number of positives (>= 1).
    """

    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher | None = None,
        cls_weight: float = 1.0,
        l1_weight: float = 5.0,
        giou_weight: float = 2.0,
        qfl_beta: float = 2.0,
        sync_cls_avg_factor: bool = False,
        classification: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
    ):
        self.num_classes = num_classes
        self.classification = classification or QualityFocalLoss(qfl_beta)
        self.matcher = matcher or HungarianMatcher()
        self.cls_weight, self.l1_weight, self.giou_weight = cls_weight, l1_weight, giou_weight
        self.qfl_beta, self.sync_cls_avg_factor = qfl_beta, sync_cls_avg_factor

    def loss_from_targets(
        self,
        logits: Tensor,
        boxes: Tensor,
        labels: Tensor,
        label_weights: Tensor,
        box_targets: Tensor,
        box_weights: Tensor,
        factors: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Losses given per-query targets.

        Args:
            logits ``(B, Q, K)``; boxes ``(B, Q, 4)`` predicted normalised cxcywh; labels ``(B, Q)`` (K = background);
            label_weights ``(B, Q)``; box_targets ``(B, Q, 4)`` normalised cxcywh; box_weights ``(B, Q, 4)``;
            factors ``(B, 4)`` = (w, h, w, h) per image.
        """
        with torch.autocast(device_type=logits.device.type, enabled=False):  # losses always in float32
            return self._loss_from_targets(
                logits.float(), boxes.float(), labels, label_weights.float(), box_targets.float(),
                box_weights.float(), factors.float(),
            )

    def _loss_from_targets(self, logits, boxes, labels, label_weights, box_targets, box_weights, factors):
        batch, queries, num_classes = logits.shape
        logits = logits.reshape(-1, num_classes)
        boxes = boxes.reshape(-1, 4)
        labels, label_weights = labels.reshape(-1), label_weights.reshape(-1)
        box_targets, box_weights = box_targets.reshape(-1, 4), box_weights.reshape(-1, 4)
        factors = factors[:, None].expand(batch, queries, 4).reshape(-1, 4)

        positive = (labels >= 0) & (labels < num_classes)
        num_pos = positive.sum().to(logits.dtype)
        cls_norm = mean_over_ranks(num_pos) if self.sync_cls_avg_factor else num_pos
        cls_norm = cls_norm.clamp(min=1.0)
        # IoU of every row, kept where positive (a mask, not a gather: no host sync per layer).
        iou = aligned_iou(cxcywh_to_xyxy(boxes.detach()), cxcywh_to_xyxy(box_targets))
        quality = torch.where(positive, iou, torch.zeros_like(iou))
        loss_cls = (self.classification(logits, labels, quality) * label_weights).sum() / cls_norm

        box_norm = mean_over_ranks(num_pos).clamp(min=1.0)
        loss_iou = weighted_giou(
            cxcywh_to_xyxy(boxes) * factors, cxcywh_to_xyxy(box_targets) * factors, box_weights.mean(-1), box_norm
        )
        loss_bbox = weighted_l1(boxes, box_targets, box_weights, box_norm)
        return self.cls_weight * loss_cls, self.l1_weight * loss_bbox, self.giou_weight * loss_iou

    def matching_loss(
        self, logits: Tensor, boxes: Tensor, gt_boxes: list[Tensor], gt_labels: list[Tensor], factors: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One-to-one loss: Hungarian matching then :meth:`loss_from_targets`.

        ``gt_boxes``: per image ``(G_i, 4)`` normalised cxcywh; ``gt_labels``: ``(G_i,)``.
        """
        return self.matching_losses([(logits, boxes)], gt_boxes, gt_labels, factors)[0]

    def matching_losses(
        self, predictions: list[tuple[Tensor, Tensor]], gt_boxes: list[Tensor], gt_labels: list[Tensor],
        factors: Tensor,
    ) -> list[tuple[Tensor, Tensor, Tensor]]:
        """:meth:`matching_loss` for several prediction sets ``[(logits (B, Q, K), boxes (B, Q, 4)), ...]`` with all
        Hungarian problems solved after one device->host transfer (:meth:`HungarianMatcher.match_many`)."""
        matches = self.matcher.match_many(
            [(logits.detach().float(), boxes.detach().float()) for logits, boxes in predictions],
            gt_boxes, gt_labels, factors,
        )
        return [self._loss_from_matches(logits, boxes, per_image, gt_boxes, gt_labels, factors)
                for (logits, boxes), per_image in zip(predictions, matches)]

    def _loss_from_matches(self, logits, boxes, matches, gt_boxes, gt_labels, factors):
        batch, queries, _ = logits.shape
        labels = torch.full((batch, queries), self.num_classes, dtype=torch.long, device=logits.device)
        box_targets = boxes.new_zeros(batch, queries, 4)
        box_weights = boxes.new_zeros(batch, queries, 4)
        for image, (query_index, gt_index) in enumerate(matches):
            labels[image, query_index] = gt_labels[image][gt_index]
            box_targets[image, query_index] = gt_boxes[image][gt_index]
            box_weights[image, query_index] = 1.0
        label_weights = boxes.new_ones(batch, queries)
        return self.loss_from_targets(logits, boxes, labels, label_weights, box_targets, box_weights, factors)

    def denoising_loss(
        self,
        logits: Tensor,
        boxes: Tensor,
        max_gt: int,
        num_groups: int,
        gt_boxes: list[Tensor],
        gt_labels: list[Tensor],
        factors: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Loss of the ``(B, Nd, .)`` denoising outputs: slot ``g * 2 * max_gt + j`` reconstructs GT ``j``;
        every other slot (negative copies, padding) is background with weight 1
        (docs/architecture.md#denoising-loss)."""
        batch, num_dn, _ = logits.shape
        labels = torch.full((batch, num_dn), self.num_classes, dtype=torch.long, device=logits.device)
        box_targets = boxes.new_zeros(batch, num_dn, 4)
        box_weights = boxes.new_zeros(batch, num_dn, 4)
        for image in range(batch):
            count = len(gt_labels[image])
            if count == 0:
                continue
            slots = (torch.arange(num_groups, device=logits.device)[:, None] * 2 * max_gt
                     + torch.arange(count, device=logits.device)).flatten()
            labels[image, slots] = gt_labels[image].repeat(num_groups)
            box_targets[image, slots] = gt_boxes[image].repeat(num_groups, 1)
            box_weights[image, slots] = 1.0
        label_weights = boxes.new_ones(batch, num_dn)
        return self.loss_from_targets(logits, boxes, labels, label_weights, box_targets, box_weights, factors)
