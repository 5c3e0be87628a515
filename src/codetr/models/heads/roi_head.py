"""RoI head of Co-DETR's Faster R-CNN auxiliary branch (``CoStandardRoIHead``, docs/architecture.md#roi-head,
keys docs/architecture.md#state-dict).

Per image: max-IoU assignment (0.5) of the RPN proposals, GT boxes prepended as candidates, random sampling of
512 RoIs (<= 25 % positives). RoI features: ``torchvision.ops.roi_align`` (aligned, adaptive sampling; identical
to the reference's RoIAlign per the oracle's op check) on one of the first 5 pyramid levels chosen by RoI size.
Box head (``roi_bbox_head.ConvFCBBoxHead``): ``Shared2FC`` (2 fcs, class-specific deltas; R50 / Swin-L) or the
ViT-L head (4 convs + GN, 1 fc, class-agnostic deltas); softmax classifier (K + 1, background last).
Losses: CE (x12) over sampled RoIs, GIoU (x120) of the decoded GT-class box, averaged over all sampled RoIs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import generalized_box_iou_loss

from codetr.models.assigners import MaxIoUAssigner
from codetr.models.box_coder import DeltaXYWHBoxCoder
from codetr.models.heads.positives import PositiveSet
from codetr.models.heads.roi_bbox_head import ConvFCBBoxHead
from codetr.models.heads.rpn_head import grouped_nms
from codetr.models.roi_extractor import MultiLevelRoIExtractor
from codetr.models.samplers import RandomSampler, SamplingResult

_EPS = torch.finfo(torch.float32).eps


class RoIHead(nn.Module):
    """Faster R-CNN second stage on the first ``len(strides)`` pyramid levels.

    Args:
        num_classes: K. in_channels: pyramid width. fc_channels: shared fc width (1024; tiny oracle 128).
        num_shared_convs, conv_channels, norm_groups, num_shared_fcs, reg_class_agnostic: box head layout
            (defaults = Shared2FC; ViT-L COCO: 4 convs, 1 fc, class-agnostic), see ``ConvFCBBoxHead``.
        strides: RoI extraction levels (4, 8, 16, 32, 64). roi_size: RoIAlign output (7). sampling_ratio: 0 =
            adaptive. finest_scale: level of a RoI = ``clamp(floor(log2(sqrt(wh) / finest_scale + 1e-6)))``.
        pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality: ``MaxIoUAssigner``.
        num_samples, pos_fraction, add_gt_as_proposals: ``RandomSampler``.
        target_stds: coder normalisation. loss_cls_weight / loss_bbox_weight: 1*12 / 10*12.
        max_positive_candidates: cap of the RoIs per image handed to the positive queries (reference 2000).
        test_score_thr, test_nms_iou, test_max_per_img: ``predict`` (two-stage debug evaluation).
    """

    def __init__(
        self,
        num_classes: int = 80,
        in_channels: int = 256,
        fc_channels: int = 1024,
        strides: Sequence[int] = (4, 8, 16, 32, 64),
        roi_size: int = 7,
        sampling_ratio: int = 0,
        finest_scale: float = 56,
        pos_iou_thr: float = 0.5,
        neg_iou_thr: float = 0.5,
        min_pos_iou: float = 0.5,
        match_low_quality: bool = False,
        num_samples: int = 512,
        pos_fraction: float = 0.25,
        add_gt_as_proposals: bool = True,
        target_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
        loss_cls_weight: float = 12.0,
        loss_bbox_weight: float = 120.0,
        max_positive_candidates: int = 2000,
        test_score_thr: float = 0.0,
        test_nms_iou: float = 0.5,
        test_max_per_img: int = 100,
        num_shared_convs: int = 0,
        conv_channels: int = 256,
        norm_groups: int = 32,
        num_shared_fcs: int = 2,
        reg_class_agnostic: bool = False,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.bbox_head = ConvFCBBoxHead(
            in_channels,
            roi_size,
            fc_channels,
            num_classes,
            num_shared_convs=num_shared_convs,
            conv_channels=conv_channels,
            norm_groups=norm_groups,
            num_shared_fcs=num_shared_fcs,
            reg_class_agnostic=reg_class_agnostic,
        )
        self.strides, self.roi_size = list(strides), roi_size
        self.extractor = MultiLevelRoIExtractor(strides, roi_size, sampling_ratio, finest_scale)
        self.assigner = MaxIoUAssigner(pos_iou_thr, neg_iou_thr, min_pos_iou, match_low_quality)
        self.sampler = RandomSampler(num_samples, pos_fraction, add_gt_as_proposals=add_gt_as_proposals)
        self.coder = DeltaXYWHBoxCoder(stds=target_stds)
        self.loss_cls_weight, self.loss_bbox_weight = loss_cls_weight, loss_bbox_weight
        self.max_positive_candidates = max_positive_candidates
        self.test_score_thr, self.test_nms_iou, self.test_max_per_img = (
            test_score_thr,
            test_nms_iou,
            test_max_per_img,
        )

    def roi_levels(self, boxes: Tensor) -> Tensor:
        """``(R, 4)`` xyxy -> ``(R,)`` pyramid level index by RoI scale."""
        return self.extractor.levels(boxes)

    def roi_features(self, feats: Sequence[Tensor], rois: Tensor) -> Tensor:
        """feats: per level ``(B, C, H_l, W_l)``; rois ``(R, 5)`` = (batch index, x1, y1, x2, y2)
        -> ``(R, C, S, S)``."""
        return self.extractor(feats, rois)

    def sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]) -> list[SamplingResult]:
        """Assign and sample every image in order (the random stream follows the reference)."""
        results = []
        for boxes, target in zip(proposals, targets):
            boxes = boxes.detach().float()
            gt_boxes, gt_labels = target["boxes"].to(boxes), target["labels"]
            assign = self.assigner(boxes, gt_boxes, gt_labels)
            results.append(self.sampler(assign, boxes, gt_boxes, gt_labels))
        return results

    def loss(
        self,
        feats: Sequence[Tensor],
        proposals: list[Tensor],
        image_sizes: Tensor,
        targets: list[dict[str, Tensor]],
    ) -> tuple[dict[str, Tensor], PositiveSet]:
        """Losses ``{'loss_cls', 'loss_bbox', 'acc'}`` and the sampled RoIs as a ``PositiveSet``.

        feats: first 5 pyramid levels; proposals: per image ``(N_i, 4)`` xyxy (detached RPN output);
        targets: per image ``boxes`` (G, 4) xyxy and ``labels`` (G,) in [0, K).
        """
        samples = self.sample(proposals, targets)
        rois = torch.cat(
            [
                torch.cat([s.sampled_priors.new_full((s.num_sampled, 1), i), s.sampled_priors], 1)
                for i, s in enumerate(samples)
            ]
        )
        roi_feats = self.roi_features(feats, rois)
        logits, deltas = self.bbox_head(roi_feats)
        logits, deltas = logits.float(), deltas.float()
        labels, box_targets = [], []
        for s in samples:
            lab = torch.full((s.num_sampled,), self.num_classes, dtype=torch.long, device=rois.device)
            lab[: len(s.pos_inds)] = s.pos_gt_labels
            tgt = rois.new_zeros(s.num_sampled, 4)
            tgt[: len(s.pos_inds)] = s.pos_gt_boxes
            labels.append(lab)
            box_targets.append(tgt)
        label_all, target_all = torch.cat(labels), torch.cat(box_targets)
        num_rois = len(rois)
        cls_avg = max(float(num_rois), 1.0)
        loss_cls = (
            self.loss_cls_weight * F.cross_entropy(logits, label_all, reduction="sum") / (cls_avg + _EPS)
        )
        acc = (logits.argmax(dim=1) == label_all).float().mean() * 100.0 if num_rois else logits.sum() * 0
        pos = label_all < self.num_classes
        if bool(pos.any()):
            pos_deltas = self.bbox_head.class_deltas(deltas[pos], label_all[pos])
            decoded = self.coder.decode(rois[pos, 1:], pos_deltas)
            giou = generalized_box_iou_loss(decoded, target_all[pos], reduction="sum")
            loss_bbox = self.loss_bbox_weight * giou / (num_rois + _EPS)
        else:
            loss_bbox = deltas.sum() * 0
        losses = {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "acc": acc.detach()}

        keep = min([self.max_positive_candidates] + [s.num_sampled for s in samples])
        counts = [s.num_sampled for s in samples]

        def features() -> list[Tensor]:
            return [f[:keep] for f in roi_feats.mean(dim=(-2, -1)).split(counts)]

        positives = PositiveSet(
            coords=[s.sampled_priors[:keep] for s in samples],
            labels=[lab[:keep] for lab in labels],
            targets=[t[:keep] for t in box_targets],
            features=features,
        )
        return losses, positives

    @torch.no_grad()
    def predict(
        self, feats: Sequence[Tensor], proposals: list[Tensor], image_sizes: Tensor
    ) -> list[dict[str, Tensor]]:
        """Two-stage debug detections: per image ``{boxes (N, 4) xyxy clipped, scores (N,), labels (N,)}``.

        Softmax scores, per-class decoding (the one box repeated for class-agnostic heads) clipped to the image,
        per-class NMS, ``test_max_per_img`` best.
        """
        rois = torch.cat([torch.cat([p.new_full((len(p), 1), i), p], 1) for i, p in enumerate(proposals)])
        roi_feats = self.roi_features(feats, rois)
        logits, deltas = self.bbox_head(roi_feats)
        scores_all, deltas = logits.float().softmax(-1), deltas.float()
        results, start = [], 0
        for i, props in enumerate(proposals):
            n = len(props)
            scores = scores_all[start : start + n, :-1]
            dl = self.bbox_head.all_class_deltas(deltas[start : start + n]).reshape(n * self.num_classes, 4)
            priors = props.float().repeat_interleave(self.num_classes, dim=0)
            boxes = self.coder.decode(priors, dl, max_shape=image_sizes[i].tolist())
            start += n
            labels = torch.arange(self.num_classes, device=rois.device).repeat(n)
            scores = scores.reshape(-1)
            ok = torch.nonzero(scores > self.test_score_thr).view(-1)
            boxes, scores, labels = boxes[ok], scores[ok], labels[ok]
            keep = grouped_nms(boxes, scores, labels, self.test_nms_iou)[: self.test_max_per_img]
            results.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
        return results
