"""``Detector``: a trained codetr model as a plain Python object (no Hydra, no Lightning).

    from codetr import Detector
    detector = Detector.from_checkpoint("outputs/demo/runs/<run>/checkpoints/last.ckpt")
    found = detector.predict(["a.jpg", "b.png"], score_threshold=0.3)   # [Detections, Detections]

The checkpoint says how to rebuild the model (:mod:`codetr.inference.description`); images are resized by the
recipe's test pipeline and normalised as in evaluation; the main head runs alone (eval mode: no auxiliary head).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from codetr.checkpoint_io import load_detector_weights, load_weights_file
from codetr.data.collate import normalize_images
from codetr.inference.description import ModelDescription, describe_recipe, read_description
from codetr.inference.inputs import ImageLike, is_single_image, prepare_batch, resize_pipeline, to_uint8_rgb
from codetr.inference.tta import TTAConfig, merge_views, unflip
from codetr.models.mask_ops import paste_masks
from codetr.utils import rle

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Detections:
    """One image's detections: ``boxes`` ``(N, 4)`` float32 xyxy in original image pixels, ``scores`` ``(N,)``
    descending, ``labels`` ``(N,)`` int64 contiguous class indices, ``names`` their class names (or the index as
    text when the model has no names); ``image_size`` ``(h, w)`` of the original image.

    Instance-segmentation models also give ``masks`` ``(N, h, w)`` bool at the original image size (or, with
    ``mask_format="rle"``, ``rles``: COCO compressed RLE dicts with ``size`` and ``counts``) and ``mask_scores``
    ``(N,)``: the box score times the predicted mask IoU, what segmentation AP ranks by."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor
    names: list[str]
    image_size: tuple[int, int]
    masks: Tensor | None = None
    mask_scores: Tensor | None = None
    rles: list[dict] | None = None

    def __len__(self) -> int:
        return len(self.scores)

    def above(self, score_threshold: float) -> Detections:
        keep = self.scores >= score_threshold
        names = [n for n, k in zip(self.names, keep.tolist()) if k]
        rles = [r for r, k in zip(self.rles, keep.tolist()) if k] if self.rles is not None else None
        return Detections(self.boxes[keep], self.scores[keep], self.labels[keep], names, self.image_size,
                          self.masks[keep] if self.masks is not None else None,
                          self.mask_scores[keep] if self.mask_scores is not None else None, rles)

    def as_rle(self) -> Detections:
        """The same detections with the masks as compressed RLE (``rles``) instead of bitmaps."""
        if self.masks is None:
            return self
        return Detections(self.boxes, self.scores, self.labels, self.names, self.image_size, None, self.mask_scores,
                          encode_masks(self.masks))

    def to_dict(self) -> dict[str, Any]:
        out = {"boxes": self.boxes.tolist(), "scores": self.scores.tolist(), "labels": self.labels.tolist(),
               "names": list(self.names), "image_size": list(self.image_size)}
        if self.masks is not None or self.rles is not None:
            out["masks"] = self.rles if self.rles is not None else encode_masks(self.masks)
            out["mask_scores"] = self.mask_scores.tolist() if self.mask_scores is not None else out["scores"]
        return out


def encode_masks(masks: Tensor) -> list[dict]:
    """``(N, H, W)`` bool -> COCO compressed RLE dicts (``counts`` as text)."""
    return [rle.encode(mask) for mask in masks]


class Detector:
    """Runs ``model`` (``model(images, image_sizes)`` in eval mode -> per image boxes xyxy input pixels, scores,
    labels; a :class:`codetr.models.co_detr.CoDETR`) on images prepared as ``description`` says."""

    def __init__(self, model: nn.Module, description: ModelDescription, device: str | torch.device = "cpu",
                 tta: TTAConfig | None = None, eval_module: str | None = None):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if eval_module is not None:  # detr (default) | one-stage | two-stage: the auxiliary heads' own detections
            self.model.eval_module = eval_module
        self.description, self.tta = description, tta
        self.pixel_mean = torch.tensor(description.pixel_mean, dtype=torch.float32, device=self.device)
        self.pixel_std = torch.tensor(description.pixel_std, dtype=torch.float32, device=self.device)
        self.size_divisor = int(description.test_transform.get("size_divisor", 1) or 1)
        branch = getattr(self.model, "mask_branch", None)
        self.mask_threshold = float(branch.mask_threshold) if branch is not None else 0.5
        self._pipelines: dict[float, Any] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu", *, recipe: str | None = None,
                        overrides: Sequence[str] = (), prefer_ema: bool = True, tta: TTAConfig | None = None,
                        class_names: Sequence[str] | None = None, eval_module: str | None = None) -> Detector:
        """Load a codetr checkpoint (training ``.ckpt`` or ``python -m codetr.convert`` output), read safely
        (``weights_only=True``). EMA weights are used when the file has them and ``prefer_ema``.

        ``recipe`` (+ ``overrides``) describes the model of a checkpoint that carries no description (older files);
        for one that does, they replace it. ``class_names`` replaces the stored names. ``eval_module``
        ``"one-stage"`` / ``"two-stage"`` answers with the ATSS / Faster R-CNN auxiliary head instead of the DETR
        head (the reference's ``eval_module``).
        """
        checkpoint = load_weights_file(path)
        if recipe is not None:
            description = describe_recipe(recipe, overrides)
        else:
            description = read_description(checkpoint, path)
        if class_names is not None:
            description.class_names = [str(n) for n in class_names]
        model = build_model(description)
        load_detector_weights(model, checkpoint, prefer_ema=prefer_ema, strict_classes=True, source=str(path))
        return cls(model, description, device=device, tta=tta, eval_module=eval_module)

    @classmethod
    def from_pretrained(cls, name: str | Path, recipe: str | None = None, device: str | torch.device = "cpu", *,
                        overrides: Sequence[str] = (), weights_dir: str | Path | None = None,
                        cache_dir: str | Path | None = None, class_names: Sequence[str] | None = None,
                        eval_module: str | None = None) -> Detector:
        """A published model: a hub id of :data:`codetr.inference.pretrained_models.OFFICIAL_MODELS` (e.g.
        ``"zongzhuofan/co-detr-vit-large-coco-instance"``: recipe known), ``hf://<owner>/<repo>/<file>`` or a local
        official / codetr checkpoint (``recipe=`` names the codetr recipe it was trained with).

        The file is looked for in ``weights_dir``, ``$TORCH_HOME/hub/checkpoints`` and the Hugging Face cache, then
        downloaded; it is converted once (:mod:`codetr.convert`) into ``cache_dir`` (default
        ``$CODETR_CACHE/converted``, ``~/.cache/codetr``), which later calls load directly. Offline without the file:
        ``FileNotFoundError`` naming the file, its address and where to put it.
        """
        from codetr.convert import convert_file
        from codetr.inference import pretrained_models as published
        from codetr.models.backbones.pretrained import PretrainedWeightsUnavailable, resolve_weights

        model = published.lookup(name, recipe)
        # the published files share one name (pytorch_model.pth): a weights_dir holds each under its repository's name
        weights_dir = published.local_folder(model.source, weights_dir)
        try:
            path = resolve_weights(model.source, weights_dir)
        except PretrainedWeightsUnavailable as error:
            raise FileNotFoundError(_unavailable_message(model.source, weights_dir)) from error
        checkpoint = load_weights_file(path)
        if model.recipe is None:
            if "codetr_model" not in checkpoint:
                raise ValueError(f"{path}: name the recipe the checkpoint was trained with: "
                                 "Detector.from_pretrained(..., recipe='<experiment>')")
            return cls.from_checkpoint(path, device, class_names=class_names, eval_module=eval_module)
        root = Path(cache_dir) if cache_dir is not None else None
        converted = published.converted_path(path, model.recipe, tuple(overrides), root)
        if not converted.is_file():
            description = describe_recipe(model.recipe, overrides)
            temporary = converted.with_suffix(".partial")
            expected = {k: v.shape for k, v in build_model(description).state_dict().items()}
            convert_file(path, temporary, num_classes=description.num_classes, expected=expected,
                         description=description.to_dict())
            os.replace(temporary, converted)
        return cls.from_checkpoint(converted, device, class_names=class_names, eval_module=eval_module)

    @property
    def class_names(self) -> list[str] | None:
        return self.description.class_names

    def name_of(self, label: int) -> str:
        names = self.class_names
        return names[label] if names is not None and 0 <= label < len(names) else str(label)

    # ------------------------------------------------------------------ running
    def _pipeline(self, scale: float):
        if scale not in self._pipelines:
            self._pipelines[scale] = resize_pipeline(self.description.test_transform, scale)
        return self._pipelines[scale]

    def _autocast(self, precision: str | None):
        if precision in (None, "fp32"):
            return contextlib.nullcontext()
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        return torch.autocast(self.device.type, dtype=AUTOCAST_DTYPES[precision])

    def detect_view(self, images: Sequence[Tensor], scale: float = 1.0, flipped: bool = False,
                    precision: str | None = None, min_score: float = 0.0) -> list[dict[str, Tensor]]:
        """Raw detections (all the post-processor keeps, with ``scores >= min_score``) of uint8 ``(3, H, W)`` images
        seen at ``scale`` times the test size, mirrored when ``flipped``; boxes xyxy in ORIGINAL, unmirrored pixels,
        on the CPU. Masks (``(N, h, w)`` bool, original size) are pasted for those detections only."""
        views = [image.flip(-1) if flipped else image for image in images]
        batch = prepare_batch(views, self._pipeline(scale), self.size_divisor).to(self.device)
        with torch.inference_mode(), self._autocast(precision):
            normalized = normalize_images(batch.images, batch.padding_mask, self.pixel_mean, self.pixel_std)
            found = self.model(normalized, batch.image_sizes)
        out = []
        for det, (w_scale, h_scale), image in zip(found, batch.scale_factors.tolist(), images):
            if min_score > 0:
                kept = det["scores"] >= min_score
                det = {k: v[kept] for k, v in det.items()}
            # resized frame -> original pixels (padding lies bottom/right, so no offset is involved)
            boxes = det["boxes"].float().cpu() / torch.tensor([w_scale, h_scale, w_scale, h_scale])
            entry = {"scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}
            if "mask_probs" in det:  # pasted in the view's frame, then mirrored back with the boxes
                masks = paste_masks(det["mask_probs"].float().cpu(), boxes, *image.shape[-2:],
                                    threshold=self.mask_threshold)
                entry["masks"] = masks.flip(-1) if flipped else masks
                entry["mask_scores"] = det["mask_scores"].float().cpu()
            if flipped:
                boxes = unflip(boxes, image.shape[-1])
            out.append({"boxes": boxes, **entry})
        return out

    def detect(self, images: Sequence[Tensor], tta: TTAConfig | None = None,
               precision: str | None = None, min_score: float = 0.0) -> list[dict[str, Tensor]]:
        """:meth:`detect_view` at the test size (detections below ``min_score`` dropped before their masks are
        pasted), or every TTA view merged (:mod:`codetr.inference.tta`; each view keeps ``tta.min_score``)."""
        if tta is None:
            return self.detect_view(images, precision=precision, min_score=min_score)
        per_view = [self.detect_view(images, scale, flipped, precision, tta.min_score)
                    for scale, flipped in tta.views()]
        return [merge_views([view[i] for view in per_view], tta) for i in range(len(images))]

    def predict(self, images: ImageLike | Sequence[ImageLike], score_threshold: float = 0.0, batch_size: int = 1,
                tta: TTAConfig | None = None, precision: str | None = None,
                mask_format: str = "bitmap") -> Detections | list[Detections]:
        """Detections of one image (-> :class:`Detections`) or of a sequence (-> a list, same order).

        Args:
            images: paths, PIL images, numpy ``(H, W, 3)`` uint8 arrays or uint8 ``(3, H, W)`` tensors, any sizes.
            score_threshold: detections below it are dropped.
            batch_size: images per forward pass (padded to the largest of them).
            tta: test-time augmentation (default: the detector's ``tta``, normally none).
            precision: ``bf16`` / ``fp16`` autocast (GPU), or None / ``fp32``.
            mask_format: instance-segmentation models: ``bitmap`` (``Detections.masks``, bool at the original
                size) or ``rle`` (``Detections.rles``, COCO compressed RLE).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mask_format not in ("bitmap", "rle"):
            raise ValueError(f"mask_format must be bitmap or rle, got {mask_format!r}")
        single = is_single_image(images)
        items = [images] if single else list(images)
        tta = tta if tta is not None else self.tta
        results: list[Detections] = []
        for start in range(0, len(items), batch_size):
            chunk = [to_uint8_rgb(item) for item in items[start:start + batch_size]]
            for image, det in zip(chunk, self.detect(chunk, tta, precision, score_threshold)):
                labels = det["labels"].long()
                found = Detections(det["boxes"], det["scores"], labels, [self.name_of(k) for k in labels.tolist()],
                                   tuple(image.shape[-2:]), det.get("masks"), det.get("mask_scores"))
                found = found.above(score_threshold)
                results.append(found.as_rle() if mask_format == "rle" else found)
        return results[0] if single else results

    def export(self, path: str | Path, format: str = "onnx", **options: Any) -> Path:
        """Export the inference model (:func:`codetr.inference.export.export_detector`)."""
        from codetr.inference.export import export_detector

        return export_detector(self, path, format, **options)


def _unavailable_message(source: str, weights_dir: str | Path | None) -> str:
    from codetr.models.backbones.pretrained import parse_source

    parsed = parse_source(source)
    filename = parsed.filename if parsed is not None else Path(source).name
    repo = parsed.hf_repo if parsed is not None else None
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints"
    places = ([str(Path(weights_dir) / filename)] if weights_dir else []) + [str(torch_home / filename)]
    address = f"https://huggingface.co/{repo}/resolve/main/{parsed.hf_file}" if repo else source
    return (f"{source} is not available: {filename} was found in none of {', '.join(places)} or the Hugging Face "
            f"cache, and it could not be downloaded (offline?). Download {address} on a machine with network and put "
            f"it at {places[0]} (or pass its path: Detector.from_pretrained('/path/to/{filename}', recipe=...)).")


def build_model(description: ModelDescription) -> nn.Module:
    """The detector of ``description`` (guarded instantiation: codetr / torch targets only), in eval mode."""
    from codetr.utils import instantiate_checked

    return instantiate_checked(description.detector_config()).eval()
