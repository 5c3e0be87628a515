"""LSJ and DETR-style augmentation pipelines (docs/architecture.md#data) on ``torchvision.transforms.v2`` +
``tv_tensors``.

v2 provides flips, resizes (``ScaleJitter``, ``RandomShortestSize``, ``Resize``), padding and box sanitising; the
few steps it lacks are written here: resizes with the reference's nearest-pixel size rounding, the LSJ jitter +
"crop to at most S x S" step (fused so masks never exist at the full jittered size), the absolute-range random
crop, boxes recomputed from masks, the reference's drop-and-redraw box filter, padding to a fixed canvas, and the
bookkeeping the model and evaluation need (``image_size`` as the model sees it, ``scale_factor`` to map
predictions back to the original image).

Every pipeline maps a sample dict (see :class:`codetr.data.coco.CocoDetection`) to a sample dict with the extra
keys ``image_size`` ``(h, w)`` and ``scale_factor`` ``(w_scale, h_scale)``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


def _size(sample: dict) -> tuple[int, int]:
    return tuple(sample["image"].shape[-2:])


def _rounded_size(height: int, width: int, ratio: float) -> tuple[int, int]:
    """Resized ``(h, w)`` rounded to the nearest pixel like the reference (v2 truncates, which can lose 1 px)."""
    return max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))


class KeepRatioResize(v2.RandomShortestSize):
    """v2 ``RandomShortestSize`` (short side drawn from ``min_size``, long side <= ``max_size``, keep ratio) with the
    reference's nearest-pixel rounding. ``min_size = [S], max_size = S`` fits the long side to ``S`` (LSJ test)."""

    def make_params(self, flat_inputs: list) -> dict:
        height, width = v2.query_size(flat_inputs)
        short = self.min_size[int(torch.randint(len(self.min_size), ()))]
        ratio = short / min(height, width)
        if self.max_size is not None:
            ratio = min(ratio, self.max_size / max(height, width))
        return {"size": _rounded_size(height, width, ratio)}


class LongSideJitter(v2.ScaleJitter):
    """v2 ``ScaleJitter`` on a square target ``S``: the long side becomes ``S * r``, ``r ~ U(scale_range)``, with
    the reference's nearest-pixel rounding."""

    def make_params(self, flat_inputs: list) -> dict:
        return {"size": self.draw_size(*v2.query_size(flat_inputs))}

    def draw_size(self, height: int, width: int) -> tuple[int, int]:
        scale = self.scale_range[0] + float(torch.rand(())) * (self.scale_range[1] - self.scale_range[0])
        ratio = min(self.target_size[0] / height, self.target_size[1] / width) * scale
        return _rounded_size(height, width, ratio)


def _nearest_source_index(start: int, count: int, in_size: int, out_size: int) -> torch.Tensor:
    """Source rows / columns that ``F.interpolate(mode="nearest")`` reads for output indices
    ``start .. start + count - 1`` when resizing ``in_size`` -> ``out_size`` (float32 scale, floor, clamp)."""
    index = torch.arange(start, start + count)
    if in_size == out_size:
        return index
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    return (index.float() * scale).floor().long().clamp(max=in_size - 1)


class JitterCrop(v2.Transform):
    """:class:`LongSideJitter` followed by :class:`CropAtMost` in one step (same random draws, same output), with
    the instance masks gathered directly at the cropped nearest-neighbour positions instead of being resized to
    the full jittered size first (up to 2x the canvas per side and per instance) and then cropped."""

    def __init__(self, size: int, scale_range=(0.1, 2.0), recompute_from_masks: bool = True):
        super().__init__()
        self.jitter = LongSideJitter((size, size), scale_range=tuple(scale_range), antialias=True)
        self.size, self.recompute = size, recompute_from_masks

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        height, width = _size(sample)
        new_h, new_w = self.jitter.draw_size(height, width)
        rest = {k: v for k, v in sample.items() if k != "masks"}
        resized = v2.Resize((new_h, new_w), antialias=True)(rest)
        ch, cw = min(new_h, self.size), min(new_w, self.size)
        top = int(torch.randint(0, new_h - ch + 1, ()).item())
        left = int(torch.randint(0, new_w - cw + 1, ()).item())
        masks = None
        if "masks" in sample:
            rows = _nearest_source_index(top, ch, height, new_h)
            cols = _nearest_source_index(left, cw, width, new_w)
            plain = sample["masks"].as_subclass(torch.Tensor)
            # gathering whole rows is fast, gathering along the last dim is not: select columns as rows of the
            # transposed masks, then rows
            picked = plain.transpose(1, 2).contiguous().index_select(1, cols).transpose(1, 2).index_select(1, rows)
            masks = tv_tensors.Mask(picked.contiguous())
        return crop_sample(resized, top, left, ch, cw, self.recompute, cropped_masks=masks)


class RecordResize(v2.Transform):
    """Remembers the content size after resizing: ``scale_factor`` relative to ``orig_size`` and ``image_size``."""

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        h, w = _size(sample)
        oh, ow = sample["orig_size"]
        return {**sample, "image_size": (h, w), "scale_factor": (w / ow, h / oh)}


class CropAtMost(v2.Transform):
    """Random crop of ``(min(h, S), min(w, S))`` (LSJ's ``absolute_range`` crop to the canvas); boxes are shifted
    and clipped; with masks, boxes are recomputed as the tight boxes of the cropped masks."""

    def __init__(self, size: int, recompute_from_masks: bool = True):
        super().__init__()
        self.size, self.recompute = size, recompute_from_masks

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        h, w = _size(sample)
        ch, cw = min(h, self.size), min(w, self.size)
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return crop_sample(sample, top, left, ch, cw, self.recompute)


class RandomAbsoluteCrop(v2.Transform):
    """DETR-aug crop: height and width drawn independently and uniformly from ``[min(side, lo), min(side, hi)]``."""

    def __init__(self, low: int = 384, high: int = 600):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        h, w = _size(sample)
        ch = int(torch.randint(min(h, self.low), min(h, self.high) + 1, ()).item())
        cw = int(torch.randint(min(w, self.low), min(w, self.high) + 1, ()).item())
        top = int(torch.randint(0, h - ch + 1, ()).item())
        left = int(torch.randint(0, w - cw + 1, ()).item())
        return crop_sample(sample, top, left, ch, cw, recompute_from_masks=False)


def masks_to_boxes_safe(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes of ``(N, H, W)`` masks with an exclusive max (``x2 = last column + 1``, the reference's
    convention) and ``[0, 0, 0, 0]`` for empty masks. Written here because ``torchvision.ops.masks_to_boxes`` is
    inclusive and undefined on empty masks."""
    if len(masks) == 0:
        return torch.zeros(0, 4)
    flat = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    rows, cols = flat.amax(2) > 0, flat.amax(1) > 0  # (N, H), (N, W); uint8 amax is far faster than bool any
    height, width = rows.shape[1], cols.shape[1]
    x1 = cols.byte().argmax(1)
    x2 = width - cols.flip(1).byte().argmax(1)
    y1 = rows.byte().argmax(1)
    y2 = height - rows.flip(1).byte().argmax(1)
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return boxes * rows.any(1, keepdim=True)


def mask_areas(masks: torch.Tensor) -> torch.Tensor:
    """Pixel count of each ``(N, H, W)`` bool / 0-1 uint8 mask, ``(N,)`` int32 (row sums in int16: W < 32768)."""
    flat = masks.view(torch.uint8) if masks.dtype == torch.bool else masks
    if masks.shape[-1] < 32768:
        return flat.sum(2, dtype=torch.int16).sum(1, dtype=torch.int32)
    return flat.sum((1, 2), dtype=torch.int32)


def crop_sample(sample: dict, top: int, left: int, height: int, width: int, recompute_from_masks: bool,
                cropped_masks: torch.Tensor | None = None) -> dict:
    """Crop image / masks; boxes are shifted and clipped, boxes left without area (outside the crop) are removed.
    With ``recompute_from_masks`` the kept boxes become the tight boxes of their cropped masks (possibly empty,
    ``[0, 0, 0, 0]``, when the mask does not reach into the crop: :class:`DropSmallBoxes` removes those).
    ``cropped_masks``: the masks already cropped by the caller (``sample`` then carries none)."""
    out = dict(sample)
    out["image"] = TF.crop(sample["image"], top, left, height, width)
    boxes = sample["boxes"].as_subclass(torch.Tensor) - torch.tensor([left, top, left, top], dtype=torch.float32)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    everything = bool(inside.all())  # skip copying the masks when no box leaves
    out["labels"] = sample["labels"] if everything else sample["labels"][inside]
    boxes = boxes if everything else boxes[inside]
    if "masks" in sample or cropped_masks is not None:
        masks = cropped_masks if cropped_masks is not None else TF.crop(sample["masks"], top, left, height, width)
        out["masks"] = masks if everything else tv_tensors.wrap(masks.as_subclass(torch.Tensor)[inside], like=masks)
        if recompute_from_masks:
            boxes = masks_to_boxes_safe(out["masks"].as_subclass(torch.Tensor))
    out["boxes"] = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width))
    return out


def drop_empty(sample: dict, min_size: float) -> dict:
    """Remove boxes (and their labels / masks) whose width or height is not above ``min_size``."""
    boxes = sample["boxes"].as_subclass(torch.Tensor)
    keep = ((boxes[:, 2] - boxes[:, 0]) > min_size) & ((boxes[:, 3] - boxes[:, 1]) > min_size)
    if bool(keep.all()):
        return dict(sample)
    out = dict(sample)
    out["boxes"] = tv_tensors.wrap(boxes[keep], like=sample["boxes"])
    out["labels"] = sample["labels"][keep]
    if "masks" in sample:
        out["masks"] = tv_tensors.wrap(sample["masks"].as_subclass(torch.Tensor)[keep], like=sample["masks"])
    return out


class DropSmallBoxes(v2.Transform):
    """Drop boxes whose width or height is ``<= min_size``. With ``discard_if_all_dropped``, a sample that had
    boxes here and loses all of them is marked ``discard = True`` (the dataset draws another image), as the
    reference's ``FilterAnnotations``; a sample arriving without boxes (e.g. a crop without objects) is kept."""

    def __init__(self, min_size: float, discard_if_all_dropped: bool = False):
        super().__init__()
        self.min_size, self.discard = min_size, discard_if_all_dropped

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        out = drop_empty(sample, self.min_size)
        if self.discard and len(sample["boxes"]) > 0 and len(out["boxes"]) == 0:
            out["discard"] = True
        return out


class PadToCanvas(v2.Transform):
    """Pad bottom/right to ``S x S`` with ``fill`` (LSJ: 114 before normalisation); ``image_size`` = canvas."""

    def __init__(self, size: int, fill: int = 114):
        super().__init__()
        self.size, self.fill = size, fill

    def forward(self, sample: dict) -> dict:  # type: ignore[override]
        h, w = _size(sample)
        padding = [0, 0, self.size - w, self.size - h]
        out = dict(sample)
        out["image"] = TF.pad(sample["image"], padding, fill=self.fill)
        if "masks" in sample:
            out["masks"] = TF.pad(sample["masks"], padding, fill=0)
        out["boxes"] = tv_tensors.wrap(sample["boxes"].as_subclass(torch.Tensor), like=sample["boxes"],
                                       canvas_size=(self.size, self.size))
        out["image_size"] = (self.size, self.size)
        return out


class Pipeline(v2.Compose):
    """A v2 ``Compose`` over sample dicts (a sample marked ``discard`` is redrawn by the dataset)."""

    def __init__(self, transforms: Sequence):
        super().__init__(list(transforms))


def lsj_train(canvas_size: int = 1024, scale_range=(0.1, 2.0), pad_value: int = 114, min_box_size: float = 0.01,
              hflip_prob: float = 0.5, **_: object) -> Pipeline:
    """LSJ load pipeline (docs/architecture.md#lsj): jitter the long side to S*r, crop to at most S x S (boxes
    from masks), drop boxes <= ``min_box_size``, flip, pad to S x S. Copy-Paste runs afterwards on two such
    samples."""
    return Pipeline(
        [
            JitterCrop(canvas_size, scale_range),  # = LongSideJitter then CropAtMost, lighter on masks
            DropSmallBoxes(min_box_size, discard_if_all_dropped=True),
            v2.RandomHorizontalFlip(hflip_prob),
            RecordResize(),
            PadToCanvas(canvas_size, pad_value),
        ]
    )


def lsj_test(canvas_size: int = 1024, pad_value: int = 114, **_: object) -> Pipeline:
    """Fit the long side to S keeping the ratio, pad to S x S."""
    return Pipeline([KeepRatioResize([canvas_size], max_size=canvas_size, antialias=True), v2.ClampBoundingBoxes(),
                     RecordResize(),
                     PadToCanvas(canvas_size, pad_value)])


def detr_train(scales=(480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800), max_size: int = 1333,
               crop_scales=(400, 500, 600), crop_max_size: int = 4200, crop_size=(384, 600), hflip_prob: float = 0.5,
               **_: object) -> Pipeline:
    """DETR augmentation (docs/architecture.md#detr-aug): flip, then 50/50 multi-scale resize or (resize ->
    absolute-range crop -> multi-scale resize)."""
    multi_scale = KeepRatioResize(list(scales), max_size=max_size, antialias=True)
    crop_branch = v2.Compose([
        KeepRatioResize(list(crop_scales), max_size=crop_max_size, antialias=True),
        RandomAbsoluteCrop(*crop_size),
        KeepRatioResize(list(scales), max_size=max_size, antialias=True),
    ])
    return Pipeline([v2.RandomHorizontalFlip(hflip_prob), v2.RandomChoice([multi_scale, crop_branch]),
                     v2.ClampBoundingBoxes(), DropSmallBoxes(0.0), RecordResize()])


def detr_test(test_scale: int = 800, test_max_size: int = 1333, **_: object) -> Pipeline:
    return Pipeline([KeepRatioResize([test_scale], max_size=test_max_size, antialias=True), v2.ClampBoundingBoxes(),
                     RecordResize()])


def pipeline_keys(name: str) -> set[str]:
    """The ``aug`` keys the train and test pipelines of augmentation ``name`` read (their parameters)."""
    builders = {"lsj": (lsj_train, lsj_test), "detr": (detr_train, detr_test)}
    if name not in builders:
        raise ValueError(f"unknown augmentation {name!r}: choose lsj or detr")
    return {parameter.name for builder in builders[name] for parameter in inspect.signature(builder).parameters.values()
            if parameter.kind is not inspect.Parameter.VAR_KEYWORD}


def build_pipeline(aug: Mapping, train: bool) -> Pipeline:
    """Pipeline from an ``aug/*.yaml`` mapping (``name`` = lsj or detr, the rest are its parameters)."""
    params = {k: v for k, v in dict(aug).items() if k != "name"}
    name = aug.get("name")
    builders = {("lsj", True): lsj_train, ("lsj", False): lsj_test, ("detr", True): detr_train,
                ("detr", False): detr_test}
    if (name, train) not in builders:
        raise ValueError(f"unknown augmentation {name!r}: choose lsj or detr")
    return builders[(name, train)](**params)
