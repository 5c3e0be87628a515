"""ATSS auxiliary head of Co-DETR (``CoATSSHead``, docs/architecture.md#atss,
state-dict keys docs/architecture.md#state-dict).

One square anchor (8 x stride) per location of the 6-level auxiliary pyramid, ATSS assignment (top 9 per level),
sigmoid focal loss (x12), centerness-weighted GIoU of the decoded boxes (x24), centerness BCE (x12). All anchors
of every image (un-subsampled, zero boxes where invalid) are handed to the positive queries.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss

from codetr.models.anchors import AnchorGenerator
from codetr.models.assigners import ATSSAssigner
from codetr.models.box_coder import DeltaXYWHBoxCoder
from codetr.models.heads.positives import PositiveSet
from codetr.models.heads.rpn_head import grouped_nms
from codetr.models.losses.set_criterion import mean_over_ranks

_EPS = torch.finfo(torch.float32).eps


class ConvGNReLU(nn.Module):
    """3x3 conv (no bias) -> GroupNorm -> ReLU; submodule names ``conv`` / ``gn`` as in the checkpoints."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(num_groups, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.gn(self.conv(x)))


class Scale(nn.Module):
    """Learnable scalar multiplier, stored as a 1-element parameter ``scale`` of shape ``(1,)``.

    The reference stores it 0-d; FSDP2 (``fully_shard``) cannot shard 0-d parameters, so it is kept 1-d here and a
    0-d tensor in a loaded state dict (official checkpoints, older codetr ones) is reshaped on load.
    """

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(value)]))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        key = prefix + "scale"
        if key in state_dict and state_dict[key].dim() == 0:
            state_dict[key] = state_dict[key].reshape(1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def centerness_targets(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` from the anchor centre to the GT sides -> ``(N,)``."""
    cx = (anchors[:, 2] + anchors[:, 0]) / 2
    cy = (anchors[:, 3] + anchors[:, 1]) / 2
    lr = torch.stack([cx - gt_boxes[:, 0], gt_boxes[:, 2] - cx], dim=1)
    tb = torch.stack([cy - gt_boxes[:, 1], gt_boxes[:, 3] - cy], dim=1)
    return torch.sqrt((lr.min(dim=-1)[0] / lr.max(dim=-1)[0]) * (tb.min(dim=-1)[0] / tb.max(dim=-1)[0]))


class ATSSHead(nn.Module):
    """ATSS head.

    Args:
        num_classes: K. in_channels / feat_channels: pyramid / tower width. stacked_convs: tower depth (1).
        num_groups: GroupNorm groups. strides, ratios, octave_base_scale, scales_per_octave: anchors.
        topk: ATSS candidates per level. target_stds: coder normalisation (means 0).
        focal_alpha, focal_gamma: sigmoid focal loss. loss_*_weight: 12 / 24 / 12 (base x 6 layers x lambda 2).
        prior_prob, init_std: classifier bias prior and normal init std of all convs.
        test_nms_pre, test_score_thr, test_nms_iou, test_max_per_img, min_bbox_size: ``predict`` ('one-stage').
            ``min_bbox_size`` None keeps every decoded box, as the original Co-DETR code (mmdet 2.x dense heads ignore
            the setting): boxes clipped to zero width at the border are kept; a number drops boxes whose width or
            height is not above it (mmdet 3.x).
    """

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        feat_channels: int = 256,
        stacked_convs: int = 1,
        num_groups: int = 32,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        ratios: Sequence[float] = (1.0,),
        octave_base_scale: float = 8,
        scales_per_octave: int = 1,
        topk: int = 9,
        target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        loss_cls_weight: float = 12.0,
        loss_bbox_weight: float = 24.0,
        loss_centerness_weight: float = 12.0,
        prior_prob: float = 0.01,
        init_std: float = 0.01,
        test_nms_pre: int = 1000,
        test_score_thr: float = 0.0,
        test_nms_iou: float = 0.6,
        test_max_per_img: int = 100,
        min_bbox_size: float | None = None,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.anchor_generator = AnchorGenerator(strides, ratios, octave_base_scale, scales_per_octave)
        num_anchors = self.anchor_generator.num_base_anchors
        self.cls_convs = nn.ModuleList(
            [
                ConvGNReLU(in_channels if i == 0 else feat_channels, feat_channels, num_groups)
                for i in range(stacked_convs)
            ]
        )
        self.reg_convs = nn.ModuleList(
            [
                ConvGNReLU(in_channels if i == 0 else feat_channels, feat_channels, num_groups)
                for i in range(stacked_convs)
            ]
        )
        self.atss_cls = nn.Conv2d(feat_channels, num_anchors * num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(feat_channels, num_anchors * 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(feat_channels, num_anchors, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in strides])
        self.assigner = ATSSAssigner(topk)
        self.coder = DeltaXYWHBoxCoder(stds=target_stds)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.loss_cls_weight, self.loss_bbox_weight = loss_cls_weight, loss_bbox_weight
        self.loss_centerness_weight = loss_centerness_weight
        self.test_nms_pre, self.test_score_thr, self.test_nms_iou = test_nms_pre, test_score_thr, test_nms_iou
        self.test_max_per_img, self.min_bbox_size = test_max_per_img, min_bbox_size
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=init_std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per level: logits ``(B, H*W*A, K)``, deltas ``(B, H*W*A, 4)``, centerness logits ``(B, H*W*A)``."""
        logits, deltas, centerness = [], [], []
        for x, scale in zip(feats, self.scales):
            cls_feat, reg_feat = x, x
            for conv in self.cls_convs:
                cls_feat = conv(cls_feat)
            for conv in self.reg_convs:
                reg_feat = conv(reg_feat)
            batch = x.shape[0]
            logits.append(self.atss_cls(cls_feat).permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes))
            deltas.append(scale(self.atss_reg(reg_feat)).float().permute(0, 2, 3, 1).reshape(batch, -1, 4))
            centerness.append(self.atss_centerness(reg_feat).permute(0, 2, 3, 1).reshape(batch, -1))
        return logits, deltas, centerness

    def targets(
        self, feat_sizes, image_sizes: Tensor, targets: list[dict[str, Tensor]], device
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-anchor targets over all levels: anchors ``(B, N, 4)`` (zeros where invalid), labels ``(B, N)``
        (K = negative / invalid), box targets ``(B, N, 4)`` xyxy (zeros for negatives), label weights ``(B, N)``."""
        level_anchors = self.anchor_generator.grid_anchors(feat_sizes, device)
        anchors = torch.cat(level_anchors)
        num = len(anchors)
        out_anchors, out_labels, out_targets, out_weights = [], [], [], []
        for i, target in enumerate(targets):
            flags = self.anchor_generator.valid_flags(feat_sizes, image_sizes[i].tolist(), device)
            valid = torch.cat(flags)
            priors = anchors[valid]
            gt_boxes = target["boxes"].to(priors)
            assign = self.assigner(priors, [int(f.sum()) for f in flags], gt_boxes, target["labels"])
            labels = torch.full((num,), self.num_classes, dtype=torch.long, device=device)
            boxes = anchors.new_zeros(num, 4)
            pos = assign.gt_inds > 0
            valid_idx = torch.nonzero(valid).view(-1)
            labels[valid_idx[pos]] = assign.labels[pos]
            boxes[valid_idx[pos]] = gt_boxes[assign.gt_inds[pos] - 1]
            out_anchors.append(torch.where(valid[:, None], anchors, torch.zeros_like(anchors)))
            out_labels.append(labels)
            out_targets.append(boxes)
            out_weights.append(valid.float())
        return (
            torch.stack(out_anchors),
            torch.stack(out_labels),
            torch.stack(out_targets),
            torch.stack(out_weights),
        )

    def loss(
        self, feats: Sequence[Tensor], image_sizes: Tensor, targets: list[dict[str, Tensor]],
        valid_sizes: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], PositiveSet]:
        """Losses ``{'loss_cls', 'loss_bbox', 'loss_centerness'}`` (summed over levels) and all anchors as a
        ``PositiveSet``. feats: 6 levels ``(B, C, H_l, W_l)``; targets: ``boxes`` (G, 4) xyxy, ``labels`` (G,)."""
        logits, deltas, centerness = self.forward(feats)
        device = logits[0].device
        anchors, labels, box_targets, weights = self.targets(
            [f.shape[-2:] for f in feats], image_sizes if valid_sizes is None else valid_sizes, targets, device
        )
        logits = torch.cat(logits, dim=1).float()
        deltas = torch.cat(deltas, dim=1).float()
        centerness = torch.cat(centerness, dim=1).float()
        pos = labels < self.num_classes
        # Normaliser of the classification and centerness losses: positives per image, an image without any
        # counting as 1 (the reference's SamplingResult.num_pos = max(#pos, 1), summed over the batch in
        # ATSSHead.get_targets), averaged over ranks. LSJ crops leave images without boxes often.
        num_pos = mean_over_ranks(pos.sum(dim=1).clamp(min=1).sum().float())
        onehot = F.one_hot(labels, self.num_classes + 1)[..., : self.num_classes].float()
        focal = sigmoid_focal_loss(logits, onehot, self.focal_alpha, self.focal_gamma, reduction="none")
        loss_cls = self.loss_cls_weight * (focal * weights[..., None]).sum() / (num_pos + _EPS)
        has_pos = bool(pos.any())
        if has_pos:
            pos_anchors, pos_targets = anchors[pos], box_targets[pos]
            ctr_targets = centerness_targets(pos_anchors, pos_targets)
            ctr_total = ctr_targets.sum().detach()
        else:
            ctr_total = deltas.new_zeros(())
        # every rank joins this all-reduce, with or without positives (a skipped collective hangs DDP)
        ctr_sum = mean_over_ranks(ctr_total).clamp(min=1.0)
        if has_pos:
            decoded = self.coder.decode(pos_anchors, deltas[pos])
            giou = generalized_box_iou_loss(decoded, pos_targets, reduction="none")
            # "+ 0 * all deltas": levels without positives stay in the graph (zero gradient) like the reference,
            # so every scale is used in each step (DDP without find_unused_parameters)
            loss_bbox = self.loss_bbox_weight * (giou * ctr_targets).sum() / (1.0 + _EPS) / ctr_sum + deltas.sum() * 0
            bce = F.binary_cross_entropy_with_logits(centerness[pos], ctr_targets, reduction="sum")
            loss_centerness = self.loss_centerness_weight * bce / (num_pos + _EPS)
        else:
            loss_bbox = deltas.sum() * 0
            loss_centerness = centerness.sum() * 0
        def features() -> list[Tensor]:
            # (B, locations, C), level-major and row-major like the anchors; each location's vector repeated for
            # its anchors
            flat = torch.cat([f.flatten(2) for f in feats], dim=2).transpose(1, 2)
            per_location = anchors.shape[1] // flat.shape[1]
            return list(flat.repeat_interleave(per_location, dim=1).unbind(0))

        positives = PositiveSet(
            list(anchors.unbind(0)), list(labels.unbind(0)), list(box_targets.unbind(0)), features
        )
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_centerness}, positives

    @torch.no_grad()
    def predict(self, feats: Sequence[Tensor], image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """One-stage debug detections: per image ``{boxes (N, 4) xyxy clipped, scores (N,), labels (N,)}``.

        Per level the ``test_nms_pre`` best (anchor, class) scores above ``test_score_thr``; score = sigmoid(cls) *
        sigmoid(centerness); per-class NMS; ``test_max_per_img`` best.
        """
        logits, deltas, centerness = self.forward(feats)
        level_anchors = self.anchor_generator.grid_anchors([f.shape[-2:] for f in feats], feats[0].device)
        results = []
        for i in range(len(image_sizes)):
            all_boxes, all_scores, all_labels = [], [], []
            for level, anchors in enumerate(level_anchors):
                scores = logits[level][i].float().sigmoid()
                candidates = torch.nonzero(scores > self.test_score_thr)
                flat = scores[scores > self.test_score_thr]
                flat, order = flat.sort(descending=True)
                top = min(self.test_nms_pre, len(flat))
                rows, classes = candidates[order[:top]].unbind(1)
                ctr = centerness[level][i].float().sigmoid()[rows]
                all_boxes.append(
                    self.coder.decode(anchors[rows], deltas[level][i].float()[rows], image_sizes[i].tolist())
                )
                all_scores.append(flat[:top] * ctr)
                all_labels.append(classes)
            boxes, scores, labels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_labels)
            if self.min_bbox_size is not None and self.min_bbox_size >= 0:
                wh = boxes[:, 2:] - boxes[:, :2]
                ok = (wh[:, 0] > self.min_bbox_size) & (wh[:, 1] > self.min_bbox_size)
                boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
            keep = grouped_nms(boxes, scores, labels, self.test_nms_iou)[: self.test_max_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
