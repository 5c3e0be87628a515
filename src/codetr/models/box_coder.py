"""``DeltaXYWH`` box coder of the auxiliary heads (RPN, ATSS, RoI head).

Written by hand (torchvision's detection ``BoxCoder`` uses weights instead of means/stds, a different wh clamp
and no border clipping). Boxes are ``xyxy`` absolute pixels; deltas are ``(dx, dy, dw, dh)``:

    dx = (gx - px) / pw,  dy = (gy - py) / ph,  dw = log(gw / pw),  dh = log(gh / ph)

then normalised as ``(delta - mean) / std``. Decoding inverts this, clamping ``|dw|, |dh|`` to
``|log(wh_ratio_clip)|`` (reference 16 / 1000) and optionally clipping to the image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class DeltaXYWHBoxCoder:
    """Encode / decode ``xyxy`` boxes relative to ``xyxy`` priors (anchors or proposals).

    Args:
        means, stds: delta normalisation (RPN: 0 / 1; ATSS and RoI head: 0 / (0.1, 0.1, 0.2, 0.2)).
        wh_ratio_clip: limit of the predicted size change; ``|dw|, |dh| <= |log(wh_ratio_clip)|``.
    """

    def __init__(
        self,
        means: Sequence[float] = (0.0, 0.0, 0.0, 0.0),
        stds: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        wh_ratio_clip: float = 16 / 1000,
    ):
        self.means = tuple(float(m) for m in means)
        self.stds = tuple(float(s) for s in stds)
        self.max_ratio = abs(math.log(wh_ratio_clip))

    def encode(self, priors: Tensor, gt_boxes: Tensor) -> Tensor:
        """``(N, 4)`` priors and ``(N, 4)`` matched GT boxes (xyxy) -> ``(N, 4)`` normalised deltas."""
        priors, gt_boxes = priors.float(), gt_boxes.float()
        px = (priors[..., 0] + priors[..., 2]) * 0.5
        py = (priors[..., 1] + priors[..., 3]) * 0.5
        pw = priors[..., 2] - priors[..., 0]
        ph = priors[..., 3] - priors[..., 1]
        gx = (gt_boxes[..., 0] + gt_boxes[..., 2]) * 0.5
        gy = (gt_boxes[..., 1] + gt_boxes[..., 3]) * 0.5
        gw = gt_boxes[..., 2] - gt_boxes[..., 0]
        gh = gt_boxes[..., 3] - gt_boxes[..., 1]
        deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, priors: Tensor, deltas: Tensor, max_shape: Sequence[int] | None = None) -> Tensor:
        """``(N, 4)`` priors and ``(N, 4)`` deltas -> ``(N, 4)`` xyxy boxes.

        ``max_shape = (h, w)`` clips x to ``[0, w]`` and y to ``[0, h]`` (used for proposals / predictions; the
        training losses decode without clipping).
        """
        if deltas.numel() == 0:
            return deltas.reshape(0, 4)
        denorm = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        dxy, dwh = denorm[:, :2], denorm[:, 2:]
        pxy = (priors[:, :2] + priors[:, 2:]) * 0.5
        pwh = priors[:, 2:] - priors[:, :2]
        dwh = dwh.clamp(min=-self.max_ratio, max=self.max_ratio)
        gxy = pxy + pwh * dxy
        gwh = pwh * dwh.exp()
        boxes = torch.cat([gxy - gwh * 0.5, gxy + gwh * 0.5], dim=-1)
        if max_shape is not None:
            h, w = float(max_shape[0]), float(max_shape[1])
            boxes = torch.stack(
                [
                    boxes[:, 0].clamp(0, w),
                    boxes[:, 1].clamp(0, h),
                    boxes[:, 2].clamp(0, w),
                    boxes[:, 3].clamp(0, h),
                ],
                dim=-1,
            )
        return boxes
