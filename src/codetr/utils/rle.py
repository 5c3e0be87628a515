"""Instance masks as COCO run-length encodings (pycocotools' ``mask`` API), and their packing into flat tensors.

Masks leave the model as RoI-grid probabilities; they are pasted into the original image one detection at a time
and encoded right away (:func:`paste_and_encode`), so an image with hundreds of detections never holds hundreds of
full-size bitmaps. For torchmetrics' cross-rank gathering, a list of RLE dicts is packed into tensors
(:func:`pack` / :func:`unpack`): the ``counts`` bytes concatenated, their lengths, and each mask's ``(h, w)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pycocotools.mask as mask_utils
import torch
from torch import Tensor


def encode(mask: Tensor | np.ndarray) -> dict:
    """One ``(H, W)`` binary mask -> ``{"size": [H, W], "counts": str}`` (compressed RLE)."""
    array = mask.cpu().numpy() if isinstance(mask, Tensor) else np.asarray(mask)
    rle = mask_utils.encode(np.asfortranarray(array.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode(rle: dict) -> np.ndarray:
    counts = rle["counts"]
    return mask_utils.decode({"size": list(rle["size"]), "counts": counts.encode() if isinstance(counts, str)
                              else counts}).astype(bool)


def paste_and_encode(probs: Tensor, boxes: Tensor, height: int, width: int, threshold: float = 0.5) -> list[dict]:
    """RoI probabilities ``(N, S, S)`` pasted at xyxy ``boxes`` ``(N, 4)`` into an ``height x width`` image and encoded,
    one detection at a time (:func:`codetr.models.mask_ops.paste_masks`)."""
    from codetr.models.mask_ops import paste_masks

    probs, boxes = probs.detach().float().cpu(), boxes.detach().float().cpu()
    return [encode(paste_masks(probs[i: i + 1], boxes[i: i + 1], height, width, threshold)[0])
            for i in range(len(probs))]


def pack(rles: Sequence[dict]) -> tuple[Tensor, Tensor, Tensor]:
    """RLE dicts -> (``counts`` bytes ``(total,)`` uint8, lengths ``(N,)`` int64, sizes ``(N, 2)`` int64)."""
    encoded = [r["counts"].encode("ascii") if isinstance(r["counts"], str) else bytes(r["counts"]) for r in rles]
    data = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if encoded and any(encoded) \
        else torch.zeros(0, dtype=torch.uint8)
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    sizes = torch.tensor([list(r["size"]) for r in rles], dtype=torch.long).reshape(-1, 2)
    return data.clone(), lengths, sizes


def unpack(data: Tensor, lengths: Tensor, sizes: Tensor) -> list[dict]:
    """Inverse of :func:`pack`."""
    raw = bytes(data.cpu().numpy().tobytes())
    out, start = [], 0
    for length, size in zip(lengths.tolist(), sizes.tolist()):
        out.append({"size": size, "counts": raw[start: start + length].decode("ascii")})
        start += length
    return out
