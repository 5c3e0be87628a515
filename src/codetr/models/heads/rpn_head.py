"""RPN of Co-DETR's Faster R-CNN auxiliary branch (docs/architecture.md#rpn,
state-dict keys docs/architecture.md#state-dict).

Runs on the 6-level auxiliary pyramid (strides 4..128) with class-agnostic GT (the detector zeroes the labels; any
positive anchor is foreground here). Every anchor on a valid location takes part, also those crossing the image
border (the reference's ``allowed_border=-1``).
Training: max-IoU assignment (low-quality matching) and random sampling of 256 anchors per image,
sigmoid-BCE and L1-on-deltas losses (weights x12), then up to 1000 detached proposals per image (per-level top
``nms_pre``, decode clipped to the image, drop empty boxes, NMS separately per level, keep the best).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import nms

from codetr.models.anchors import AnchorGenerator
from codetr.models.assigners import MaxIoUAssigner
from codetr.models.box_coder import DeltaXYWHBoxCoder
from codetr.models.samplers import RandomSampler

_EPS = torch.finfo(torch.float32).eps  # the reference divides loss sums by (avg_factor + eps)


def grouped_nms(
    boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float, split_threshold: int = 10000
) -> Tensor:
    """NMS within groups (levels or classes) -> kept indices, best score first.

    Matches the reference's batched NMS: below ``split_threshold`` boxes the groups are separated by coordinate
    offsets and one NMS runs; above it, one NMS per group and a final sort by score. Candidates are pre-ordered
    with the same (non-stable) descending sort as the reference kernel so that exactly tied scores keep the same
    boxes; ``torchvision.ops.nms`` then does the suppression (its stable sort keeps that order).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)

    def _nms(b: Tensor, s: Tensor) -> Tensor:
        order = s.sort(descending=True)[1]
        return order[nms(b[order], s[order], iou_threshold)]

    if len(boxes) < split_threshold:
        offsets = groups.to(boxes) * (boxes.max() + torch.tensor(1).to(boxes))
        return _nms(boxes + offsets[:, None], scores)
    keep_mask = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    for group in torch.unique(groups):
        members = torch.nonzero(groups == group).view(-1)
        keep_mask[members[_nms(boxes[members], scores[members])]] = True
    keep = torch.nonzero(keep_mask).view(-1)
    return keep[scores[keep].sort(descending=True)[1]]


class RPNHead(nn.Module):
    """Region proposal network: ``rpn_conv`` 3x3 + ReLU, ``rpn_cls`` 1x1 (A logits), ``rpn_reg`` 1x1 (4A deltas).

    Args:
        in_channels, feat_channels: pyramid / hidden width (256 in the reference).
        strides, ratios, octave_base_scale, scales_per_octave: anchors (A = len(ratios) * scales_per_octave).
        target_stds: delta normalisation.
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality: ``MaxIoUAssigner``.
        num_samples, pos_fraction: ``RandomSampler``.
        loss_cls_weight, loss_bbox_weight: 1 * 6 decoder layers * lambda 2 = 12 each.
        train_nms_pre, train_max_per_img, test_nms_pre, test_max_per_img, nms_iou, min_bbox_size: proposals.
        init_std: std of the normal init of the three convs (biases 0).
    """

    def __init__(
        self,
        in_channels: int = 256,
        feat_channels: int = 256,
        strides: Sequence[int] = (4, 8, 16, 32, 64, 128),
        ratios: Sequence[float] = (0.5, 1.0, 2.0),
        octave_base_scale: float = 4,
        scales_per_octave: int = 3,
        target_stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        pos_iou_thr: float = 0.7,
        neg_iou_thr: float = 0.3,
        min_pos_iou: float = 0.3,
        match_low_quality: bool = True,
        num_samples: int = 256,
        pos_fraction: float = 0.5,
        loss_cls_weight: float = 12.0,
        loss_bbox_weight: float = 12.0,
        train_nms_pre: int = 4000,
        train_max_per_img: int = 1000,
        test_nms_pre: int = 1000,
        test_max_per_img: int = 1000,
        nms_iou: float = 0.7,
        min_bbox_size: float = 0.0,
        init_std: float = 0.01,
    ):
        super().__init__()
        self.anchor_generator = AnchorGenerator(strides, ratios, octave_base_scale, scales_per_octave)
        num_anchors = self.anchor_generator.num_base_anchors
        self.rpn_conv = nn.Conv2d(in_channels, feat_channels, 3, padding=1)
        self.rpn_cls = nn.Conv2d(feat_channels, num_anchors, 1)
        self.rpn_reg = nn.Conv2d(feat_channels, num_anchors * 4, 1)
        self.coder = DeltaXYWHBoxCoder(stds=target_stds)
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality)
        self.sampler = RandomSampler(num_samples, pos_fraction, add_gt_as_proposals=False)
        self.loss_cls_weight, self.loss_bbox_weight = loss_cls_weight, loss_bbox_weight
        self.train_nms_pre, self.train_max_per_img = train_nms_pre, train_max_per_img
        self.test_nms_pre, self.test_max_per_img = test_nms_pre, test_max_per_img
        self.nms_iou, self.min_bbox_size = nms_iou, min_bbox_size
        for conv in (self.rpn_conv, self.rpn_cls, self.rpn_reg):
            nn.init.normal_(conv.weight, std=init_std)
            nn.init.zeros_(conv.bias)

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """feats: per level ``(B, C, H_l, W_l)`` -> per level logits ``(B, H_l*W_l*A)`` and deltas ``(B, H_l*W_l*A, 4)``
        flattened in anchor order ``(y, x, a)``."""
        logits, deltas = [], []
        for x in feats:
            x = F.relu(self.rpn_conv(x))
            batch = x.shape[0]
            logits.append(self.rpn_cls(x).permute(0, 2, 3, 1).reshape(batch, -1))
            deltas.append(self.rpn_reg(x).permute(0, 2, 3, 1).reshape(batch, -1, 4))
        return logits, deltas

    def loss_and_proposals(
        self, feats: Sequence[Tensor], image_sizes: Tensor, targets: list[dict[str, Tensor]],
        valid_sizes: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Losses ``{'loss_rpn_cls', 'loss_rpn_bbox'}`` (summed over levels) and per image detached proposals
        ``(N_i <= train_max_per_img, 4)`` xyxy clipped to ``image_sizes`` (B, 2) (h, w).

        targets: per image ``boxes`` (G, 4) xyxy and ``labels`` (G,) (all 0: class-agnostic).
        valid_sizes: ``(B, 2)`` region whose anchors train (the reference's per-image ``pad_shape``: the image
            padded to the pipeline's size divisor); None = ``image_sizes``.
        """
        logits, deltas = self.forward(feats)
        losses = self.loss(logits, deltas, [f.shape[-2:] for f in feats],
                           image_sizes if valid_sizes is None else valid_sizes, targets)
        with torch.no_grad():
            proposals = self.proposals(
                logits,
                deltas,
                [f.shape[-2:] for f in feats],
                image_sizes,
                self.train_nms_pre,
                self.train_max_per_img,
            )
        return losses, [p[0] for p in proposals]

    def loss(self, logits, deltas, feat_sizes, image_sizes: Tensor, targets) -> dict[str, Tensor]:
        """Sampled-anchor losses; ``logits``/``deltas`` as returned by ``forward``."""
        device = logits[0].device
        anchors = torch.cat(self.anchor_generator.grid_anchors(feat_sizes, device))
        logits = torch.cat(logits, dim=1).float()
        deltas = torch.cat(deltas, dim=1).float()
        cls_terms, box_terms, num_samples = [], [], 0
        for i, target in enumerate(targets):
            valid = torch.cat(self.anchor_generator.valid_flags(feat_sizes, image_sizes[i].tolist(), device))
            priors = anchors[valid]
            gt_boxes = target["boxes"].to(priors)
            assign = self.assigner(priors, gt_boxes, target["labels"])
            sample = self.sampler(assign, priors, gt_boxes, target["labels"])
            # the reference's normaliser: max(#pos, 1) + max(#neg, 1) per image (SamplingResult.avg_factor), so an
            # image without ground truth (0 positives) still counts one positive
            num_samples += max(len(sample.pos_inds), 1) + max(len(sample.neg_inds), 1)
            img_logits, img_deltas = logits[i][valid], deltas[i][valid]
            inds = torch.cat([sample.pos_inds, sample.neg_inds])
            cls_target = torch.zeros(len(inds), device=device)
            cls_target[: len(sample.pos_inds)] = 1.0  # class-agnostic: every positive is foreground
            cls_terms.append(
                F.binary_cross_entropy_with_logits(img_logits[inds], cls_target, reduction="sum")
            )
            if len(sample.pos_inds):
                box_target = self.coder.encode(sample.pos_priors, sample.pos_gt_boxes)
                box_terms.append((img_deltas[sample.pos_inds] - box_target).abs().sum())
            else:
                box_terms.append(img_deltas.sum() * 0)
        denom = num_samples + _EPS
        return {
            "loss_rpn_cls": self.loss_cls_weight * torch.stack(cls_terms).sum() / denom,
            "loss_rpn_bbox": self.loss_bbox_weight * torch.stack(box_terms).sum() / denom,
        }

    @torch.no_grad()
    def proposals(
        self,
        logits: list[Tensor],
        deltas: list[Tensor],
        feat_sizes,
        image_sizes: Tensor,
        nms_pre: int,
        max_per_img: int,
    ) -> list[tuple[Tensor, Tensor]]:
        """Per image ``(boxes (N, 4) xyxy clipped, scores (N,) sigmoid)``, best first (docs/architecture.md#rpn).

        Every anchor takes part, also those over the padded area (the reference does the same at this step).
        """
        level_anchors = self.anchor_generator.grid_anchors(feat_sizes, logits[0].device)
        out = []
        for i in range(len(image_sizes)):
            h, w = image_sizes[i].tolist()
            level_boxes, level_scores, level_ids = [], [], []
            for level, (lg, dl) in enumerate(zip(logits, deltas)):
                scores = lg[i].detach().float().sigmoid()
                level_deltas = dl[i].detach().float()
                anchors = level_anchors[level]
                if 0 < nms_pre < len(scores):
                    scores, order = scores.sort(descending=True)
                    scores, order = scores[:nms_pre], order[:nms_pre]
                    level_deltas, anchors = level_deltas[order], anchors[order]
                level_boxes.append(self.coder.decode(anchors, level_deltas, max_shape=(h, w)))
                level_scores.append(scores)
                level_ids.append(torch.full_like(scores, level, dtype=torch.long))
            boxes, scores, ids = torch.cat(level_boxes), torch.cat(level_scores), torch.cat(level_ids)
            if self.min_bbox_size >= 0:
                wh = boxes[:, 2:] - boxes[:, :2]
                ok = (wh[:, 0] > self.min_bbox_size) & (wh[:, 1] > self.min_bbox_size)
                if not bool(ok.all()):
                    boxes, scores, ids = boxes[ok], scores[ok], ids[ok]
            keep = grouped_nms(boxes, scores, ids, self.nms_iou)[:max_per_img]
            out.append((boxes[keep], scores[keep]))
        return out

    @torch.no_grad()
    def predict(self, feats: Sequence[Tensor], image_sizes: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Test-time proposals (docs/architecture.md#inference 'two-stage'): per image
        ``(boxes (N, 4), scores (N,))``."""
        logits, deltas = self.forward(feats)
        feat_sizes = [f.shape[-2:] for f in feats]
        return self.proposals(
            logits, deltas, feat_sizes, image_sizes, self.test_nms_pre, self.test_max_per_img
        )
