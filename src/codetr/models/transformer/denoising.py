"""Contrastive denoising (CDN) queries of DINO (docs/architecture.md#denoising), written by hand.

Random draws happen on the CPU default generator in a fixed order (label flips, new labels, box-noise signs,
box-noise magnitudes) so a run with a fixed seed reproduces the reference implementation's noise exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from codetr.models.box_ops import inverse_sigmoid, xyxy_to_cxcywh


@dataclass
class DenoisingQueries:
    """Batched DN queries.

    label_query: ``(B, Nd, C)`` content; bbox_query: ``(B, Nd, 4)`` box logits (cxcywh);
    attn_mask: ``(Nd + Nq, Nd + Nq)`` bool, True = blocked; num_queries: Nd = 2 * max_gt * num_groups;
    num_groups: G; max_gt: largest GT count in the batch (slots per positive / negative block).
    """

    label_query: Tensor
    bbox_query: Tensor
    attn_mask: Tensor
    num_queries: int
    num_groups: int
    max_gt: int


class DenoisingGenerator(nn.Module):
    """Noised copies of the ground truth, fed to the decoder in front of the matching queries.

    Each group holds a positive copy (box noise < 1 box size) and a negative copy (noise in [1, 2) box sizes);
    labels are flipped to a random class with probability ``label_noise_scale / 2``.
    """

    def __init__(
        self,
        num_classes: int,
        embed_dims: int = 256,
        num_matching_queries: int = 900,
        label_noise_scale: float = 0.5,
        box_noise_scale: float = 1.0,
        num_dn_queries: int = 100,
    ):
        super().__init__()
        self.num_classes, self.num_matching_queries = num_classes, num_matching_queries
        self.label_noise_scale, self.box_noise_scale = label_noise_scale, box_noise_scale
        self.num_dn_queries = num_dn_queries
        self.label_embedding = nn.Embedding(num_classes, embed_dims)

    def num_groups(self, max_gt: int) -> int:
        return max(1, self.num_dn_queries // max_gt) if max_gt > 0 else 1

    def forward(self, gt_boxes: list[Tensor], gt_labels: list[Tensor], image_sizes: Tensor) -> DenoisingQueries:
        """``gt_boxes``: per image ``(n_i, 4)`` xyxy absolute; ``gt_labels``: ``(n_i,)``;
        ``image_sizes``: ``(B, 2)`` (h, w)."""
        device = self.label_embedding.weight.device
        counts = [len(b) for b in gt_boxes]
        batch, max_gt = len(gt_boxes), max(counts, default=0)
        groups = self.num_groups(max_gt)
        factors = image_sizes.flip(-1).repeat(1, 2).to(torch.float32)  # (B, 4) = (w, h, w, h)
        boxes = torch.cat([b / factors[i] for i, b in enumerate(gt_boxes)]).to(device)
        labels = torch.cat(gt_labels).to(device)
        copies = 2 * groups

        # label noise (all copies)
        labels_rep = labels.repeat(copies, 1).view(-1)
        flip = torch.rand_like(labels_rep.float()) < self.label_noise_scale * 0.5
        flipped = torch.nonzero(flip).view(-1)
        new_labels = torch.randint_like(flipped, 0, self.num_classes)
        noisy_labels = labels_rep.scatter(0, flipped, new_labels)
        label_query = self.label_embedding(noisy_labels)

        # box noise on the xyxy corners, scaled by half the box size; negatives get magnitudes in [1, 2)
        n = len(boxes)
        boxes_rep = boxes.repeat(copies, 1)
        sign = torch.randint_like(boxes_rep, low=0, high=2, dtype=torch.float32) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes_rep)
        is_negative = (torch.arange(copies, device=device) % 2 == 1).repeat_interleave(n)
        noise = (magnitude + is_negative[:, None].to(magnitude.dtype)) * sign
        wh = (boxes_rep[:, 2:] - boxes_rep[:, :2]).repeat(1, 2)
        noisy = (boxes_rep + noise * wh * self.box_noise_scale / 2).clamp(0.0, 1.0)
        bbox_query = inverse_sigmoid(xyxy_to_cxcywh(noisy), eps=1e-3)

        # scatter into per-image slots: copy c, j-th GT of an image -> slot c * max_gt + j
        num_dn = copies * max_gt
        image_index = torch.cat([torch.full((c,), i, dtype=torch.long, device=device) for i, c in enumerate(counts)])
        slot = torch.cat([torch.arange(c, device=device) for c in counts])
        slot = torch.cat([slot + max_gt * c for c in range(copies)])
        image_index = image_index.repeat(copies)
        batched_labels = label_query.new_zeros(batch, num_dn, label_query.shape[-1])
        batched_boxes = bbox_query.new_zeros(batch, num_dn, 4)
        batched_labels[image_index, slot] = label_query
        batched_boxes[image_index, slot] = bbox_query
        return DenoisingQueries(
            batched_labels, batched_boxes, self.attention_mask(max_gt, groups, device), num_dn, groups, max_gt
        )

    def attention_mask(self, max_gt: int, groups: int, device: torch.device) -> Tensor:
        """Matching queries never see DN queries; DN groups never see each other; DN sees matching queries."""
        num_dn = 2 * max_gt * groups
        total = num_dn + self.num_matching_queries
        mask = torch.zeros(total, total, dtype=torch.bool, device=device)
        mask[num_dn:, :num_dn] = True
        group_of = torch.arange(num_dn, device=device) // max(2 * max_gt, 1)
        mask[:num_dn, :num_dn] = group_of[:, None] != group_of[None, :]
        return mask
