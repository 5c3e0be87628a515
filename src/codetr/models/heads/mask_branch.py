"""Instance masks for the DETR's own detections (Co-DINO-Inst; docs/architecture.md#mask-branch).

Training (``loss``): the query head's last-layer predictions over every query (denoising ones included, as the
reference's ``get_bboxes`` sees them), their top ``train_detections`` (query, class) pairs as boxes, are assigned to
the ground truth (max-IoU) and sampled with the GT boxes prepended (the RoI branch's assigner / sampler settings);
the positives' RoI features (``roi_extractor`` on the encoder pyramid) and the stride-4 level feed the multi-stage
mask head, trained with the boundary-aware loss against targets cropped from the GT masks at every stage's size;
the mask-IoU head regresses the IoU of the stage-1 mask with its whole GT mask. Keys ``loss_mask`` and
``loss_mask_iou`` (weights carry the reference's ``num_decoder_layers * lambda_2`` factor).

Inference (``predict``): masks for the final detections, in chunks of ``test_chunk`` RoIs: every stage's logits,
refined stage by stage outside the boundary band, as probabilities ``(N, S, S)`` on the RoI grid, and the mask score
``box score * predicted IoU`` of the detection's class. :func:`codetr.models.mask_ops.paste_masks` puts them into
the original image at ``mask_threshold``.

Box formats: xyxy input pixels. GT masks: per image ``(G, H, W)`` binary on the image's padded canvas.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from codetr.models.assigners import MaxIoUAssigner
from codetr.models.heads.mask_iou_head import MaskIoUHead
from codetr.models.heads.refine_mask_head import SimpleRefineMaskHead
from codetr.models.losses.bar_loss import BARCrossEntropyLoss
from codetr.models.mask_ops import area_ratios, crop_and_resize, refine_stages
from codetr.models.postprocess import top_k_detections
from codetr.models.roi_extractor import MultiLevelRoIExtractor, rois_from_boxes
from codetr.models.samplers import RandomSampler, SamplingResult


class MaskBranch(nn.Module):
    """Args:
        roi_extractor: RoI features on the encoder pyramid's first levels (output size = the head's first stage).
        mask_head: the multi-stage head; mask_iou_head: mask scoring (None: the box score is the mask score).
        assigner / sampler: the RoI branch's settings (max-IoU 0.5, 512 samples, 25 % positives, GT prepended).
        loss: the boundary-aware loss; loss_weight (1.33 x 12) / iou_loss_weight (0.5 x 12): its weights.
        train_detections: top (query, class) pairs taken as training boxes (the query head's test ``max_per_img``).
        mask_threshold: binary threshold of the probabilities (training IoU targets and pasting).
        test_chunk: RoIs per mask-head call at inference (memory).
    """

    def __init__(
        self,
        roi_extractor: MultiLevelRoIExtractor,
        mask_head: SimpleRefineMaskHead,
        loss: BARCrossEntropyLoss,
        assigner: MaxIoUAssigner,
        sampler: RandomSampler,
        mask_iou_head: MaskIoUHead | None = None,
        loss_weight: float = 1.33 * 12,
        iou_loss_weight: float = 0.5 * 12,
        train_detections: int = 1000,
        mask_threshold: float = 0.5,
        test_chunk: int = 150,
    ):
        super().__init__()
        if roi_extractor.output_size != mask_head.roi_size:
            raise ValueError(f"the mask RoI extractor gives {roi_extractor.output_size} px features but the mask "
                             f"head's first stage is {mask_head.roi_size} px (stage_sizes[0])")
        if mask_iou_head is not None and mask_iou_head.roi_size != mask_head.roi_size:
            raise ValueError(f"mask_iou_head.roi_size {mask_iou_head.roi_size} differs from the mask head's first "
                             f"stage size {mask_head.roi_size}")
        self.roi_extractor, self.mask_head, self.mask_iou_head = roi_extractor, mask_head, mask_iou_head
        self.loss_fn, self.assigner, self.sampler = loss, assigner, sampler
        self.loss_weight, self.iou_loss_weight = loss_weight, iou_loss_weight
        self.train_detections, self.mask_threshold, self.test_chunk = train_detections, mask_threshold, test_chunk

    def forward_rois(self, pyramid: Sequence[Tensor], rois: Tensor, labels: Tensor) -> tuple[list[Tensor], Tensor,
                                                                                               Tensor]:
        """(per-stage logits, RoI features, zero-valued graph term) for ``rois`` ``(R, 5)`` and their labels."""
        roi_feats = self.roi_extractor(pyramid[: self.roi_extractor.num_inputs], rois)
        stage_logits, keep = self.mask_head(roi_feats, pyramid[0], rois, labels)
        return stage_logits, roi_feats, keep

    # ------------------------------------------------------------------ training
    def training_boxes(self, logits: Tensor, boxes: Tensor, image_sizes: Tensor) -> list[Tensor]:
        """The query head's top ``train_detections`` boxes per image, xyxy input pixels (no gradient)."""
        k = min(self.train_detections, logits[0].numel())
        picked, _, _ = top_k_detections(logits.detach().float(), boxes.detach().float(), image_sizes, k)
        return list(picked.unbind(0))

    def sample(self, candidates: list[Tensor], targets: list[dict[str, Tensor]]) -> list[SamplingResult]:
        """Assign and sample each image in order (the reference's random stream, after the RPN's)."""
        results = []
        for boxes, target in zip(candidates, targets):
            gt_boxes, gt_labels = target["boxes"].to(boxes), target["labels"]
            results.append(self.sampler(self.assigner(boxes, gt_boxes, gt_labels), boxes, gt_boxes, gt_labels))
        return results

    def stage_targets(self, samples: list[SamplingResult], targets: list[dict[str, Tensor]]) -> list[Tensor]:
        """Per stage ``(P, s_i, s_i)`` binary targets of every image's positives, images concatenated."""
        per_stage: list[list[Tensor]] = [[] for _ in self.mask_head.stage_sizes]
        for sample, target in zip(samples, targets):
            for stage, size in enumerate(self.mask_head.stage_sizes):
                per_stage[stage].append(
                    crop_and_resize(target["masks"], sample.pos_priors, sample.pos_assigned_gt_inds, size))
        return [torch.cat(t) for t in per_stage]

    def loss(self, pyramid: Sequence[Tensor], logits: Tensor, boxes: Tensor, image_sizes: Tensor,
             targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        """``logits`` ``(B, Q, K)`` / ``boxes`` ``(B, Q, 4)``: the query head's last decoder layer (sigmoid cxcywh
        normalised by ``image_sizes``); targets: per image ``boxes`` ``(G, 4)``, ``labels`` ``(G,)``, ``masks``
        ``(G, H, W)``. Returns ``loss_mask`` and, with a mask-IoU head, ``loss_mask_iou``."""
        samples = self.sample(self.training_boxes(logits, boxes, image_sizes), targets)
        rois = rois_from_boxes([s.pos_priors for s in samples]).to(pyramid[0])
        labels = torch.cat([s.pos_gt_labels for s in samples]).long()
        stage_logits, roi_feats, keep = self.forward_rois(pyramid, rois, labels)
        losses = {}
        if len(rois) == 0:
            zero = sum(s.sum() * 0 for s in stage_logits) + keep
            losses["loss_mask"] = zero
        else:
            stage_targets = self.stage_targets(samples, targets)
            losses["loss_mask"] = self.loss_fn(stage_logits, stage_targets) * self.loss_weight
        if self.mask_iou_head is not None:
            stage1 = stage_logits[1].squeeze(1)
            predicted = self.mask_iou_head(roi_feats, stage1)
            if len(rois) == 0:
                losses["loss_mask_iou"] = predicted.sum() * 0
            else:
                picked = predicted[torch.arange(len(rois), device=rois.device), labels]
                iou = self.iou_targets(samples, targets, stage1, stage_targets[1])
                positive = iou > 0
                losses["loss_mask_iou"] = (F.mse_loss(picked[positive], iou[positive]) * self.iou_loss_weight
                                           if bool(positive.any()) else predicted.sum() * 0)
        return losses

    @torch.no_grad()
    def iou_targets(self, samples: list[SamplingResult], targets: list[dict[str, Tensor]], stage1_logits: Tensor,
                    stage1_targets: Tensor) -> Tensor:
        """IoU of every positive's binarised stage-1 mask with its whole GT mask (inside-box overlap, GT area from
        the inside-box area and the box's share of the GT mask)."""
        ratios = torch.cat([area_ratios(t["masks"], s.pos_priors, s.pos_assigned_gt_inds)
                            for s, t in zip(samples, targets)])
        predicted = (stage1_logits.float().sigmoid() > self.mask_threshold).float()
        overlap = (predicted * stage1_targets).sum((-1, -2))
        whole = stage1_targets.sum((-1, -2)) / (ratios + 1e-7)
        return overlap / (predicted.sum((-1, -2)) + whole - overlap)

    # ------------------------------------------------------------------ inference
    def refined_logits(self, pyramid: Sequence[Tensor], rois: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None]:
        """Final refined logits ``(R, S, S)`` of ``rois`` ``(R, 5)`` and the predicted IoU of each RoI's class
        ``(R,)`` (None without mask scoring)."""
        stage_logits, roi_feats, _ = self.forward_rois(pyramid, rois, labels)
        ious = None
        if self.mask_iou_head is not None:
            predicted = self.mask_iou_head(roi_feats, stage_logits[1].squeeze(1))
            ious = predicted.gather(1, labels.long().view(-1, 1)).squeeze(1)
        return refine_stages(stage_logits).squeeze(1), ious

    @torch.no_grad()
    def predict(self, pyramid: Sequence[Tensor], detections: list[dict[str, Tensor]]) -> list[dict[str, Tensor]]:
        """Adds to each image's detections (``boxes`` xyxy input pixels, ``scores``, ``labels``) ``mask_probs``
        ``(N, S, S)`` (RoI grid of the last stage, refined) and ``mask_scores`` ``(N,)``."""
        out = []
        size = self.mask_head.stage_sizes[-1]  # the final logits' grid
        for image, det in enumerate(detections):
            boxes, labels = det["boxes"], det["labels"]
            feats = [level[image: image + 1] for level in pyramid]
            probs, ious = [], []
            for start in range(0, len(boxes), self.test_chunk):
                rois = rois_from_boxes([boxes[start: start + self.test_chunk]]).to(pyramid[0])
                logits, iou = self.refined_logits(feats, rois, labels[start: start + self.test_chunk])
                probs.append(logits.float().sigmoid())
                if iou is not None:
                    ious.append(iou)
            mask_probs = torch.cat(probs) if probs else boxes.new_zeros((0, size, size))
            scores = det["scores"] * torch.cat(ious).to(det["scores"]) if ious else det["scores"]
            out.append({**det, "mask_probs": mask_probs, "mask_scores": scores})
        return out

    def deploy(self, pyramid: Sequence[Tensor], boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Export mode, for the post-processor's fixed-shape top-k (``boxes`` ``(B, M, 4)`` xyxy input pixels,
        ``scores`` / ``labels`` ``(B, M)``): refined mask logits ``(B, M, S, S)`` and mask scores ``(B, M)``. RoIs go
        through the head ``test_chunk`` detections of every image at a time (``M`` is fixed, so the chunks are)."""
        batch, count = boxes.shape[:2]
        index = torch.arange(batch, device=boxes.device).to(boxes.dtype).view(batch, 1, 1)
        logits, ious = [], []
        for start in range(0, count, self.test_chunk):
            chunk = boxes[:, start: start + self.test_chunk]
            width = chunk.shape[1]
            rois = torch.cat([index.expand(batch, width, 1), chunk], 2).reshape(batch * width, 5)
            chunk_logits, iou = self.refined_logits(pyramid, rois.to(pyramid[0].dtype),
                                                    labels[:, start: start + self.test_chunk].reshape(-1))
            logits.append(chunk_logits.reshape(batch, width, *chunk_logits.shape[-2:]))
            if iou is not None:
                ious.append(iou.reshape(batch, width))
        mask_scores = scores * torch.cat(ious, 1).to(scores.dtype) if ious else scores
        return torch.cat(logits, 1).float(), mask_scores
