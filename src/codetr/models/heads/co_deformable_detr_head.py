"""Co-Deformable-DETR query head: the Co-Deformable transformer with its prediction branches, the learnt content
queries (mixed selection), the encoder loss over every encoder token, and the customised positive-query decoder
passes fed with the auxiliary branches' candidate boxes and features. No denoising.

Box formats: predictions are sigmoid ``cxcywh`` normalised by each image's valid size ``image_sizes`` (h, w);
ground truth arrives as ``xyxy`` absolute input pixels.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from codetr.models.box_ops import size_factors, xyxy_to_cxcywh
from codetr.models.heads.positive_queries import build_positive_queries
from codetr.models.heads.positives import PositiveSet
from codetr.models.heads.query_head import DETRQueryHead, QueryHeadLoss, layer_loss_names
from codetr.models.losses.set_criterion import SetCriterion
from codetr.models.postprocess import PostProcessor
from codetr.models.transformer.deformable_transformer import CoDeformableTransformer
from codetr.models.transformer.position import SinePositionalEncoding
from codetr.models.transformer.two_stage import EncoderState, TransformerOutput


class CoDeformableDETRHead(DETRQueryHead):
    """Query head of Co-Deformable-DETR (parameter names of the reference; ``query_embedding`` = content queries).

    Args:
        num_classes: K foreground classes.
        transformer: the built :class:`CoDeformableTransformer` (its width and layer count rule the head).
        positional_encoding: sine encoding of the level masks (reference: temperature 10000, offset -0.5).
        criterion: the built one-to-one losses (focal classification, L1, GIoU, Hungarian matcher); its class count
            must be ``num_classes``.
        num_queries: Q learnt content queries = proposals taken from the encoder.
        max_pos_queries / min_pos_queries: customised positive queries per image and auxiliary branch.
        aux_loss_weight: factor of the positive-query losses (the reference's ``lambda_1``).
        max_per_image: detections of :meth:`predict` (NMS-free top-k; the detector's post-processor, when given,
            is used instead).
    """

    def __init__(
        self,
        num_classes: int,
        transformer: CoDeformableTransformer,
        positional_encoding: SinePositionalEncoding,
        criterion: SetCriterion,
        num_queries: int = 300,
        max_pos_queries: int = 300,
        min_pos_queries: int = 9,
        aux_loss_weight: float = 1.0,
        max_per_image: int = 100,
        prior_prob: float = 0.01,
    ):
        super().__init__(num_classes, transformer, positional_encoding, prior_prob)
        if criterion.num_classes != num_classes:
            raise ValueError(f"criterion.num_classes ({criterion.num_classes}) != num_classes ({num_classes})")
        self.query_embedding = nn.Embedding(num_queries, transformer.embed_dims)
        self.criterion = criterion
        self.max_pos_queries, self.min_pos_queries = max_pos_queries, min_pos_queries
        self.aux_loss_weight, self.max_per_image = aux_loss_weight, max_per_image
        self.postprocessor = PostProcessor(max_per_image, soft_nms_iou=None)

    def forward(
        self, feats: list[Tensor], img_mask: Tensor, denoising: None = None
    ) -> tuple[list[Tensor], list[Tensor], TransformerOutput]:
        """Main pass. Returns per-layer logits ``(B, Q, K)``, boxes ``(B, Q, 4)`` and the transformer output.
        ``denoising`` exists for the detector's common call and must be None (this head has none)."""
        if denoising is not None:
            raise ValueError("Co-Deformable-DETR has no denoising queries")
        masks, pos = self.level_masks(feats, img_mask)
        out = self.transformer(feats, masks, pos, self.query_embedding.weight, self.cls_branches, self.reg_branches)
        logits, boxes = self.predictions(out.hidden, out.references)
        return logits, boxes, out

    # ------------------------------------------------------------------ training
    def loss(
        self, feats: list[Tensor], img_mask: Tensor, image_sizes: Tensor, targets: list[dict[str, Tensor]]
    ) -> QueryHeadLoss:
        """Matching losses of every decoder layer and the class-agnostic encoder loss over all tokens, with the
        encoder state and the last layer's predictions (:class:`QueryHeadLoss`)."""
        gt_boxes_abs = [t["boxes"] for t in targets]
        gt_labels = [t["labels"] for t in targets]
        logits, boxes, out = self(feats, img_mask)
        factors = size_factors(image_sizes).to(boxes[0].dtype)
        gt_boxes = [xyxy_to_cxcywh(b / factors[i]) for i, b in enumerate(gt_boxes_abs)]
        losses: dict[str, Tensor] = {}
        per_layer = self.criterion.matching_losses(list(zip(logits, boxes)), gt_boxes, gt_labels, factors)
        for names, values in zip(layer_loss_names("", "", self.num_layers), per_layer):
            losses.update(zip(names, values))
        # every encoder token is a proposal; they are matched to the boxes as one class (label 0)
        agnostic = [torch.zeros_like(labels) for labels in gt_labels]
        (encoder,) = self.criterion.matching_losses([(out.enc_logits, out.enc_boxes)], gt_boxes, agnostic, factors)
        losses.update(zip(("enc_loss_cls", "enc_loss_bbox", "enc_loss_iou"), encoder))
        return QueryHeadLoss(losses, out.encoder, logits[-1], boxes[-1])

    def loss_positive_queries(
        self, state: EncoderState, positives: PositiveSet, head_index: int, image_sizes: Tensor
    ) -> dict[str, Tensor]:
        """One extra decoder pass on an auxiliary branch's candidates and its per-layer losses. Keys
        ``loss_cls_aux`` ... ``d{k}.loss_iou_aux`` (the detector appends the branch index)."""
        if positives.features is None:
            raise ValueError(f"auxiliary branch {head_index} gives no candidate features; this head needs them")
        queries = build_positive_queries(
            positives.coords, positives.labels, positives.targets, image_sizes, self.num_classes,
            self.max_pos_queries, self.min_pos_queries, positives.features(),
        )
        hidden, references = self.transformer.forward_aux(
            state, queries.boxes, queries.features, head_index, self.reg_branches
        )
        logits, boxes = self.predictions(hidden, references)
        factors = size_factors(image_sizes).to(boxes[0].dtype)
        losses = {}
        for k, names in enumerate(layer_loss_names("", "_aux", self.num_layers)):
            values = self.criterion.loss_from_targets(
                logits[k], boxes[k], queries.labels, queries.label_weights, queries.targets, queries.box_weights,
                factors,
            )
            losses.update(zip(names, (self.aux_loss_weight * v for v in values)))
        return losses

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def predict(self, feats: list[Tensor], img_mask: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Top-k detections of the last decoder layer (xyxy input pixels); the auxiliary parts are not touched."""
        logits, boxes, _ = self(feats, img_mask)
        return self.postprocessor(logits[-1], boxes[-1], image_sizes)
