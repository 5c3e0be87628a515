"""Co-DETR detector: backbone -> neck -> query head (Co-DINO or Co-Deformable-DETR), with one-to-many auxiliary
heads (RPN + RoI, ATSS) trained on the encoder's multi-scale output. At inference only backbone, neck and query head
run.

The query head's interface (both heads): ``forward(feats, img_mask, denoising)`` -> per-layer logits, boxes and the
transformer output; ``loss(feats, img_mask, image_sizes, targets)`` -> (losses, encoder state);
``aux_pyramid(state)``; ``loss_positive_queries(state, positives, index, image_sizes)``; ``predict``. Every
auxiliary head returns its losses and a :class:`~codetr.models.heads.positives.PositiveSet`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from codetr.models.heads.mask_branch import MaskBranch
from codetr.models.heads.query_head import DETRQueryHead
from codetr.models.part_agreement import check_feature_levels, check_positive_query_branches
from codetr.models.postprocess import PostProcessor

EVAL_MODULES = ("detr", "one-stage", "two-stage")


def image_padding_mask(image_sizes: Tensor, batch_shape: Sequence[int]) -> Tensor:
    """``(B, H, W)`` bool, True outside each image's valid ``(h, w)`` (top-left aligned)."""
    height, width = batch_shape[0], batch_shape[1]  # no int(): keeps traced sizes symbolic (export)
    rows = torch.arange(height, device=image_sizes.device)[None, :, None]
    cols = torch.arange(width, device=image_sizes.device)[None, None, :]
    return (rows >= image_sizes[:, 0, None, None]) | (cols >= image_sizes[:, 1, None, None])


def _suffixed(losses: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    return {f"{key}{index}": value for key, value in losses.items()}


class CoDETR(nn.Module):
    """The detector. ``forward(images, image_sizes, targets)``.

    Args (inputs):
        images: ``(B, 3, H, W)`` normalised, padded bottom/right.
        image_sizes: ``(B, 2)`` int (h, w) valid size per image (LSJ: the whole canvas).
        targets: training only; per image ``{"boxes": (N, 4) xyxy input pixels, "labels": (N,) int64}`` and, with a
            mask branch, ``"masks"``: ``(N, H, W)`` binary on the image's padded canvas.

    Returns:
        training: dict of named loss tensors (+ ``acc0``, not a loss); eval: per image
        ``{"boxes" (N, 4) xyxy input pixels, "scores" (N,), "labels" (N,)}``; with a mask branch also
        ``"mask_probs"`` ``(N, S, S)`` (RoI grid, to paste with :func:`codetr.models.mask_ops.paste_masks`) and
        ``"mask_scores"`` ``(N,)``.

    ``postprocessor`` decodes the main head's last layer at inference (:class:`PostProcessor`, also used by the
    export in its deploy mode); None keeps the query head's own decoding settings.

    ``pad_size_divisor``: the data pipeline's per-image padding divisor; the dense auxiliary heads train the anchors
    of each image's padded region (the reference's ``pad_shape``), e.g. 32 for the ViT-L recipes, 1 otherwise.

    ``eval_module`` picks what answers at inference, as the reference's ``eval_module``: ``"detr"`` (default: the
    query head alone, NMS-free), ``"one-stage"`` (ATSS head ``bbox_head[eval_index]`` on the auxiliary pyramid,
    per-class NMS) or ``"two-stage"`` (RPN proposals -> ``roi_head[eval_index]``, per-class NMS). The last two
    evaluate the auxiliary heads themselves (debugging, ablations); they need those heads built.

    The parts must agree on feature levels and positive-query branches; a mismatch is a ``ValueError`` naming both
    values (:mod:`codetr.models.part_agreement`).
    """

    def __init__(
        self,
        backbone: nn.Module,
        neck: nn.Module,
        query_head: DETRQueryHead,
        rpn_head: nn.Module | None = None,
        roi_head: Sequence[nn.Module] | None = None,
        bbox_head: Sequence[nn.Module] | None = None,
        use_positive_queries: bool = True,
        postprocessor: PostProcessor | None = None,
        eval_module: str = "detr",
        eval_index: int = 0,
        mask_branch: MaskBranch | None = None,
        pad_size_divisor: int = 1,
    ):
        super().__init__()
        self.backbone, self.neck, self.query_head = backbone, neck, query_head
        self.rpn_head = rpn_head
        self.roi_head = nn.ModuleList(roi_head or [])
        self.bbox_head = nn.ModuleList(bbox_head or [])
        if len(self.roi_head) and rpn_head is None:
            raise ValueError("roi_head needs an rpn_head to produce proposals")
        self.use_positive_queries = use_positive_queries
        self.postprocessor = postprocessor
        if mask_branch is not None and postprocessor is None:
            raise ValueError("a mask branch needs the detector's postprocessor (it masks the decoded detections)")
        self.mask_branch = mask_branch
        self.pad_size_divisor = int(pad_size_divisor)
        self.eval_index = eval_index
        self.eval_module = eval_module
        transformer = query_head.transformer
        check_feature_levels(neck, transformer.num_levels, rpn_head, self.roi_head, self.bbox_head)
        check_positive_query_branches(len(transformer.aux_pos_trans), self.roi_head, self.bbox_head,
                                      use_positive_queries)

    @property
    def eval_module(self) -> str:
        return self._eval_module

    @eval_module.setter
    def eval_module(self, value: str) -> None:
        if value not in EVAL_MODULES:
            raise ValueError(f"eval_module must be one of {', '.join(EVAL_MODULES)}, got {value!r}")
        heads = {"one-stage": self.bbox_head, "two-stage": self.roi_head}.get(value)
        if heads is not None and len(heads) <= self.eval_index:
            kind = "bbox_head (ATSS)" if value == "one-stage" else "roi_head"
            raise ValueError(f"eval_module={value!r} evaluates {kind}[{self.eval_index}], but this detector has "
                             f"{len(heads)} such head(s) (plain DINO / Deformable-DETR build none)")
        self._eval_module = value

    def padded_sizes(self, image_sizes: Tensor, feats: list[Tensor]) -> Tensor:
        """``(B, 2)`` each image's size rounded up to ``pad_size_divisor`` (the reference's ``pad_shape``)."""
        if self.pad_size_divisor <= 1:
            return image_sizes
        d = self.pad_size_divisor
        return (image_sizes + d - 1) // d * d

    def extract_features(self, images: Tensor) -> list[Tensor]:
        return list(self.neck(self.backbone(images)))

    def forward(
        self, images: Tensor, image_sizes: Tensor, targets: list[dict[str, Tensor]] | None = None
    ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        img_mask = image_padding_mask(image_sizes, images.shape[-2:])
        feats = self.extract_features(images)
        if not self.training:
            if self.eval_module != "detr":
                return self.predict_auxiliary(feats, img_mask, image_sizes)
            if self.postprocessor is None:
                return self.query_head.predict(feats, img_mask, image_sizes)
            logits, boxes, out = self.query_head(feats, img_mask, None)
            detections = self.postprocessor(logits[-1], boxes[-1], image_sizes)
            if self.mask_branch is None:
                return detections
            return self.mask_branch.predict(self.query_head.encoder_pyramid(out.encoder), detections)
        if targets is None:
            raise ValueError("CoDETR in training mode needs targets; call .eval() for predictions")
        return self.losses(feats, img_mask, image_sizes, targets)

    def last_layer_predictions(self, feats: list[Tensor], img_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Main head only (no denoising, no auxiliary head): the last decoder layer's logits ``(B, Q, K)`` and
        boxes ``(B, Q, 4)`` sigmoid cxcywh normalised by each image's valid size."""
        logits, boxes, _ = self.query_head(feats, img_mask, None)
        return logits[-1], boxes[-1]

    @torch.no_grad()
    def predict_auxiliary(self, feats: list[Tensor], img_mask: Tensor, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Detections of an auxiliary head (``eval_module`` one-stage / two-stage) on the pyramid of the encoder
        output, per image ``{boxes (N, 4) xyxy input pixels, scores (N,), labels (N,)}``."""
        _, _, out = self.query_head(feats, img_mask, None)
        pyramid = self.query_head.aux_pyramid(out.encoder)
        if self.eval_module == "one-stage":
            return self.bbox_head[self.eval_index].predict(pyramid, image_sizes)
        proposals = [boxes for boxes, _ in self.rpn_head.predict(pyramid, image_sizes)]
        return self.roi_head[self.eval_index].predict(pyramid[:-1], proposals, image_sizes)

    def losses(
        self, feats: list[Tensor], img_mask: Tensor, image_sizes: Tensor, targets: list[dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        query = self.query_head.loss(feats, img_mask, image_sizes, targets)
        losses, state = query.losses, query.encoder
        if self.rpn_head is None and not len(self.bbox_head) and self.mask_branch is None:
            return losses
        pyramid = (self.query_head.aux_pyramid(state) if self.rpn_head is not None or len(self.bbox_head)
                   else self.query_head.encoder_pyramid(state))
        positives = []
        if self.rpn_head is not None:
            agnostic = [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])} for t in targets]
            rpn_losses, proposals = self.rpn_head.loss_and_proposals(pyramid, image_sizes, agnostic,
                                                                     self.padded_sizes(image_sizes, feats))
            losses.update(rpn_losses)
        if self.mask_branch is not None:  # after the RPN's sampling, before the RoI heads': the reference's order
            losses.update(self.mask_branch.loss(pyramid, query.logits, query.boxes, image_sizes, targets))
        if self.rpn_head is not None:
            for index, head in enumerate(self.roi_head):
                roi_losses, found = head.loss(pyramid[:-1], proposals, image_sizes, targets)
                losses.update(_suffixed(roi_losses, index))
                positives.append(found)
        for index, head in enumerate(self.bbox_head):
            head_losses, found = head.loss(pyramid, image_sizes, targets, self.padded_sizes(image_sizes, feats))
            losses.update(_suffixed(head_losses, index + len(self.roi_head)))
            positives.append(found)
        if self.use_positive_queries:
            for index, found in enumerate(positives):
                aux = self.query_head.loss_positive_queries(state, found, index, image_sizes)
                losses.update(_suffixed(aux, index))
        return losses
