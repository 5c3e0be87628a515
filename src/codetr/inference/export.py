"""Export of the inference model: ONNX, ``torch.export`` programs and AOTInductor packages.

The exported graph is :class:`InferenceModel`: normalisation -> backbone -> neck -> query head (main head only; the
auxiliary heads are not part of it) -> the post-processor's deploy mode (NMS-free top-k, fixed-shape outputs).
Deformable attention is traced through its exact PyTorch path (``grid_sample``: ONNX opset >= 16). Batch, height
and width are dynamic.

Inputs: ``images`` ``(B, 3, H, W)`` uint8 RGB, already resized by the recipe's test pipeline and padded
bottom/right (:func:`codetr.inference.inputs.prepare_batch`), and ``image_sizes`` ``(B, 2)`` int64 ``(h, w)`` valid
size per image. Outputs: ``boxes`` ``(B, M, 4)`` float32 xyxy in input pixels, ``scores`` ``(B, M)`` descending,
``labels`` ``(B, M)`` int64 (M = ``max_per_image``). A model with a mask branch adds ``mask_logits`` ``(B, M, S, S)``
(the refined last-stage logits on each detection's RoI grid, S = the head's last stage size) and ``mask_scores``
``(B, M)``; :func:`paste_exported_masks` turns one image's rows into bitmaps at the original size. Every file carries
the model description as JSON (ONNX metadata / an extra file ``codetr_model.json``) so that a runtime can prepare
images the same way.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from codetr.data.collate import normalize_images
from codetr.models.co_detr import image_padding_mask
from codetr.models.postprocess import PostProcessor
from codetr.models.transformer.ms_deform_attn import MultiScaleDeformableAttention

if TYPE_CHECKING:
    from codetr.inference.detector import Detector

FORMATS = ("onnx", "torch-export", "aoti")
DESCRIPTION_FILE = "codetr_model.json"
# Smallest padded batch side the graphs accept (the encoder must have at least as many tokens as queries, R50: 900;
# smaller images are padded up to it by :func:`pad_to_min_side`, which changes no detection).
MIN_SIDE = 128
INPUT_NAMES, OUTPUT_NAMES = ["images", "image_sizes"], ["boxes", "scores", "labels"]
MASK_OUTPUT_NAMES = [*OUTPUT_NAMES, "mask_logits", "mask_scores"]


class InferenceModel(nn.Module):
    """The deployable detector: ``forward(images uint8 (B, 3, H, W), image_sizes (B, 2))`` -> boxes, scores, labels
    (+ mask logits, mask scores) (module doc). Holds only the parts inference runs (backbone, neck, query head,
    post-processor, mask branch)."""

    def __init__(self, detector: nn.Module, pixel_mean: list[float], pixel_std: list[float]):
        super().__init__()
        self.backbone, self.neck, self.query_head = detector.backbone, detector.neck, detector.query_head
        self.mask_branch = getattr(detector, "mask_branch", None)
        postprocessor = getattr(detector, "postprocessor", None)
        self.postprocessor = postprocessor or PostProcessor(max_per_image=self.query_head.max_per_image)
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std, dtype=torch.float32), persistent=False)

    def forward(self, images: Tensor, image_sizes: Tensor) -> tuple[Tensor, ...]:
        padding = image_padding_mask(image_sizes, images.shape[-2:])
        normalized = normalize_images(images, padding, self.pixel_mean, self.pixel_std)
        feats = list(self.neck(self.backbone(normalized)))
        logits, boxes, out = self.query_head(feats, padding, None)
        found = self.postprocessor.deploy(logits[-1], boxes[-1], image_sizes)
        if self.mask_branch is None:
            return found
        pyramid = self.query_head.encoder_pyramid(out.encoder)
        return (*found, *self.mask_branch.deploy(pyramid, *found))


def paste_exported_masks(mask_logits: Tensor, boxes: Tensor, scale_factor: tuple[float, float],
                         original_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
    """One image's exported rows -> ``(M, h, w)`` bool masks at the original size: ``mask_logits`` ``(M, S, S)`` and
    ``boxes`` ``(M, 4)`` xyxy input pixels, ``scale_factor`` ``(w_scale, h_scale)`` of the test resize (input =
    original x scale), ``original_size`` ``(h, w)``; the eager :class:`codetr.inference.Detector` pastes the same way
    (its ``mask_threshold`` is the model's ``mask_branch.mask_threshold``)."""
    from codetr.models.mask_ops import paste_masks

    w_scale, h_scale = scale_factor
    original = boxes.float() / torch.tensor([w_scale, h_scale, w_scale, h_scale], dtype=torch.float32)
    return paste_masks(mask_logits.float().sigmoid(), original, int(original_size[0]), int(original_size[1]),
                       threshold)


def inference_model(detector: Detector) -> InferenceModel:
    """A copy of ``detector``'s model for export, on the CPU, with deformable attention on its exact path."""
    model = copy.deepcopy(detector.model).cpu().eval()
    for module in model.modules():
        if isinstance(module, MultiScaleDeformableAttention):
            module.impl = "pytorch"
    description = detector.description
    return InferenceModel(model, description.pixel_mean, description.pixel_std).eval()


def pad_to_min_side(images: Tensor, min_side: int = MIN_SIDE) -> Tensor:
    """Pad a ``(B, 3, H, W)`` batch bottom/right to at least ``min_side`` (the padding lies outside image_sizes)."""
    height, width = images.shape[-2:]
    if height >= min_side and width >= min_side:
        return images
    return torch.nn.functional.pad(images, (0, max(0, min_side - width), 0, max(0, min_side - height)))


def example_inputs(batch: int = 2, height: int = 160, width: int = 192) -> tuple[Tensor, Tensor]:
    """Tracing inputs: random uint8 images, the second one smaller (so the padding mask is not all False)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)
    sizes = torch.tensor([[height, width]] + [[height - 16, width - 32]] * (batch - 1), dtype=torch.long)
    return images, sizes


def dynamic_shapes(min_side: int = MIN_SIDE, max_side: int = 4096) -> dict[str, Any]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=256)
    height, width = Dim("height", min=min_side, max=max_side), Dim("width", min=min_side, max=max_side)
    return {"images": {0: batch, 2: height, 3: width}, "image_sizes": {0: batch}}


def export_program(model: InferenceModel, inputs: tuple[Tensor, Tensor] | None = None):
    """``torch.export`` of ``model`` with dynamic batch, height and width."""
    with torch.no_grad():
        return torch.export.export(model, inputs or example_inputs(), dynamic_shapes=dynamic_shapes())


def export_detector(detector: Detector, path: str | Path, format: str = "onnx",
                    opset: int = 18) -> Path:
    """Write ``detector``'s inference model to ``path`` as ``onnx``, ``torch-export`` (``.pt2``, load with
    ``torch.export.load``) or ``aoti`` (AOTInductor package, load with ``torch._inductor.aoti_load_package``)."""
    if format not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    return write_program(export_program(inference_model(detector)), path, format,
                         json.dumps(detector.description.to_dict()), opset)


def program_output_names(program: Any) -> list[str]:
    """The output names of an exported :class:`InferenceModel` (3 outputs: boxes only; 5: with masks)."""
    count = len(program.graph_signature.user_outputs)
    return MASK_OUTPUT_NAMES if count == len(MASK_OUTPUT_NAMES) else OUTPUT_NAMES


def write_program(program: Any, path: str | Path, format: str, description: str = "{}",
                  opset: int = 18) -> Path:
    """Save an exported program (:func:`export_program`) in ``format`` with the description JSON beside it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if format == "onnx":
        onnx_program = torch.onnx.export(program, f=None, input_names=INPUT_NAMES,
                                         output_names=program_output_names(program),
                                         opset_version=opset, dynamo=True, verbose=False)
        onnx_program.save(str(path))
        _add_onnx_metadata(path, {"codetr_model": description})
    elif format == "torch-export":
        torch.export.save(program, str(path), extra_files={DESCRIPTION_FILE: description})
    elif format == "aoti":
        from torch._inductor import aoti_compile_and_package

        aoti_compile_and_package(program, package_path=str(path))
    else:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {format!r}")
    return path


def _add_onnx_metadata(path: Path, entries: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))


Runner = Callable[[Tensor, Tensor], tuple[Tensor, ...]]


def load_exported(path: str | Path, format: str | None = None, threads: int | None = None) -> Runner:
    """A callable ``(images uint8 (B, 3, H, W), image_sizes (B, 2)) -> (boxes, scores, labels[, mask_logits,
    mask_scores])`` over an exported file (format from the suffix when not given: ``.onnx``; ``.pt2`` tries
    ``torch.export.load`` then AOTI)."""
    path = Path(path)
    format = format or ("onnx" if path.suffix == ".onnx" else "torch-export")
    if format == "onnx":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]

        def run_onnx(images: Tensor, sizes: Tensor) -> tuple[Tensor, ...]:
            feeds = {"images": pad_to_min_side(images).cpu().numpy(),
                     "image_sizes": sizes.cpu().numpy().astype(np.int64)}
            return tuple(torch.from_numpy(out) for out in session.run(names, feeds))

        return run_onnx
    if format == "aoti":
        from torch._inductor import aoti_load_package

        package = aoti_load_package(str(path))
        return lambda images, sizes: tuple(package(pad_to_min_side(images), sizes))
    program = torch.export.load(str(path)).module()
    return lambda images, sizes: tuple(program(pad_to_min_side(images), sizes))
