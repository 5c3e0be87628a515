"""Co-DINO query head: the DINO transformer with its prediction branches, denoising, the auxiliary feature
pyramid for the one-to-many heads, and the customised positive-query decoder passes
(docs/architecture.md#training-step, #encoder, #detr-losses, #postprocess).

Box formats: predictions are sigmoid ``cxcywh`` normalised by each image's valid size ``image_sizes`` (h, w);
ground truth arrives as ``xyxy`` absolute input pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from codetr.models.box_ops import size_factors, xyxy_to_cxcywh
from codetr.models.heads.positive_queries import build_positive_queries
from codetr.models.heads.query_head import DETRQueryHead, QueryHeadLoss, layer_loss_names
from codetr.models.losses.matcher import HungarianMatcher
from codetr.models.losses.set_criterion import SetCriterion
from codetr.models.postprocess import postprocess
from codetr.models.transformer.denoising import DenoisingGenerator
from codetr.models.transformer.dino_transformer import DinoTransformer, EncoderState, TransformerOutput
from codetr.models.transformer.position import SinePositionalEncoding


class CoDINOHead(DETRQueryHead):
    """Query head of Co-DINO.

    Args:
        num_classes: K foreground classes.
        transformer: the :class:`DinoTransformer` (its ``embed_dims``, layer and query counts rule the head).
        label_noise_scale / box_noise_scale / num_dn_queries: contrastive denoising (docs/architecture.md#denoising);
            ``use_denoising`` switches it off (ablation; the reference always trains with it).
        loss_cls_weight / loss_bbox_weight / loss_iou_weight / qfl_beta: DETR-side losses
            (docs/architecture.md#detr-losses).
        match_*: Hungarian costs; max_pos_queries: cap of customised positive queries per image
            (docs/architecture.md#positive-queries).
        max_per_image / soft_nms_iou / soft_nms_min_score / candidates_before_nms: test-time post-processing
            (docs/architecture.md#postprocess); soft_nms_iou None gives the NMS-free top-k; candidates_before_nms
            None = max_per_image (mmdet-3 port), the original uses num_queries (900).
        sync_cls_avg_factor: average the classification normaliser over ranks (original Co-DETR: True; the
            mmdet-3 port: False).
    """

    def __init__(
        self,
        num_classes: int,
        transformer: DinoTransformer,
        positional_temperature: float = 20.0,
        use_denoising: bool = True,
        label_noise_scale: float = 0.5,
        box_noise_scale: float = 1.0,
        num_dn_queries: int = 100,
        loss_cls_weight: float = 1.0,
        loss_bbox_weight: float = 5.0,
        loss_iou_weight: float = 2.0,
        qfl_beta: float = 2.0,
        match_class_weight: float = 2.0,
        match_l1_weight: float = 5.0,
        match_giou_weight: float = 2.0,
        max_pos_queries: int = 300,
        min_pos_queries: int = 9,
        max_per_image: int = 300,
        soft_nms_iou: float | None = 0.8,
        soft_nms_min_score: float = 1e-3,
        candidates_before_nms: int | None = None,
        sync_cls_avg_factor: bool = False,
        prior_prob: float = 0.01,
    ):
        positional_encoding = SinePositionalEncoding(transformer.embed_dims // 2, temperature=positional_temperature)
        super().__init__(num_classes, transformer, positional_encoding, prior_prob)
        dims = transformer.embed_dims
        self.use_denoising = use_denoising
        self.dn_generator = DenoisingGenerator(
            num_classes, dims, transformer.num_queries, label_noise_scale, box_noise_scale, num_dn_queries
        )
        matcher = HungarianMatcher(match_class_weight, match_l1_weight, match_giou_weight)
        self.criterion = SetCriterion(
            num_classes, matcher, loss_cls_weight, loss_bbox_weight, loss_iou_weight, qfl_beta, sync_cls_avg_factor
        )
        self.max_pos_queries, self.min_pos_queries = max_pos_queries, min_pos_queries
        self.max_per_image, self.soft_nms_iou, self.soft_nms_min_score = max_per_image, soft_nms_iou, soft_nms_min_score
        self.candidates_before_nms = candidates_before_nms

    def forward(
        self, feats: list[Tensor], img_mask: Tensor, denoising=None
    ) -> tuple[list[Tensor], list[Tensor], TransformerOutput]:
        """Main pass. Returns per-layer logits ``(B, Q, K)``, boxes ``(B, Q, 4)`` and the transformer output."""
        masks, pos = self.level_masks(feats, img_mask)
        out = self.transformer(feats, masks, pos, self.cls_branches, self.reg_branches, denoising)
        logits, boxes = self.predictions(out.hidden, out.references)
        if denoising is not None and denoising.num_queries == 0:
            # keeps the DN embedding in the graph when a batch has no GT (DDP needs every parameter used)
            logits[0] = logits[0] + self.dn_generator.label_embedding.weight[0, 0] * 0.0
        return logits, boxes, out

    # ------------------------------------------------------------------ training
    def loss(
        self, feats: list[Tensor], img_mask: Tensor, image_sizes: Tensor, targets: list[dict[str, Tensor]]
    ) -> QueryHeadLoss:
        """Matching, encoder and denoising losses (docs/architecture.md#matching-loss-4.4), with the encoder state
        and the last layer's predictions (:class:`QueryHeadLoss`)."""
        gt_boxes_abs = [t["boxes"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        denoising = self.dn_generator(gt_boxes_abs, gt_labels, image_sizes) if self.use_denoising else None
        logits, boxes, out = self(feats, img_mask, denoising)
        factors = size_factors(image_sizes).to(boxes[0].dtype)
        gt_boxes = [xyxy_to_cxcywh(b / factors[i]) for i, b in enumerate(gt_boxes_abs)]
        num_dn = denoising.num_queries if denoising is not None else 0
        losses: dict[str, Tensor] = {}
        # every decoder layer and the encoder proposals: all Hungarian problems in one host round trip
        predictions = [(logits[k][:, num_dn:], boxes[k][:, num_dn:]) for k in range(self.num_layers)]
        predictions.append((out.enc_topk_logits, out.enc_topk_boxes))
        per_set = self.criterion.matching_losses(predictions, gt_boxes, gt_labels, factors)
        for names, values in zip(layer_loss_names("", "", self.num_layers), per_set[:-1]):
            losses.update(zip(names, values))
        losses.update(zip(("enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"), per_set[-1]))
        if denoising is not None:
            for k, names in enumerate(layer_loss_names("dn_", "", self.num_layers)):
                values = self.criterion.denoising_loss(
                    logits[k][:, :num_dn], boxes[k][:, :num_dn], denoising.max_gt, denoising.num_groups,
                    gt_boxes, gt_labels, factors,
                )
                losses.update(zip(names, values))
        return QueryHeadLoss(losses, out.encoder, logits[-1], boxes[-1])

    def loss_positive_queries(
        self, state: EncoderState, positives, head_index: int, image_sizes: Tensor
    ) -> dict[str, Tensor]:
        """One extra decoder pass on an auxiliary branch's positives and its per-layer losses
        (docs/architecture.md#positive-queries, #positive-query-loss).
        Keys ``loss_cls_aux`` ... ``d{k}.loss_iou_aux`` (the detector appends the branch index)."""
        queries = build_positive_queries(
            positives.coords, positives.labels, positives.targets, image_sizes, self.num_classes,
            self.max_pos_queries, self.min_pos_queries,
        )
        hidden, references = self.transformer.forward_aux(state, queries.boxes, head_index, self.reg_branches)
        logits, boxes = self.predictions(hidden, references)
        factors = size_factors(image_sizes).to(boxes[0].dtype)
        losses = {}
        for k, names in enumerate(layer_loss_names("", "_aux", self.num_layers)):
            values = self.criterion.loss_from_targets(
                logits[k], boxes[k], queries.labels, queries.label_weights, queries.targets, queries.box_weights,
                factors,
            )
            losses.update(zip(names, values))
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, feats: list[Tensor], img_mask: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections of the last decoder layer (xyxy input pixels); the auxiliary parts are not touched."""
        logits, boxes, _ = self(feats, img_mask, None)
        return postprocess(
            logits[-1], boxes[-1], image_sizes, self.max_per_image, self.soft_nms_iou, self.soft_nms_min_score,
            self.candidates_before_nms,
        )
