"""Contrastive denoising queries: slot layout, noise ranges and the attention mask (docs/architecture.md#denoising)."""

import torch

from codetr.models.box_ops import cxcywh_to_xyxy
from codetr.models.transformer.denoising import DenoisingGenerator


def make(num_dn_queries=10, label_noise=0.5, box_noise=1.0):
    return DenoisingGenerator(num_classes=7, embed_dims=4, num_matching_queries=3, label_noise_scale=label_noise,
                              box_noise_scale=box_noise, num_dn_queries=num_dn_queries)


def test_groups_slots_and_padding():
    gen = make()
    boxes = [torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 100.0, 100.0]]), torch.tensor([[5.0, 5.0, 20.0, 20.0]])]
    labels = [torch.tensor([1, 2]), torch.tensor([3])]
    dn = gen(boxes, labels, torch.tensor([[100, 100], [50, 40]]))
    assert (dn.max_gt, dn.num_groups, dn.num_queries) == (2, 5, 20)
    assert dn.label_query.shape == (2, 20, 4) and dn.bbox_query.shape == (2, 20, 4)
    # image 1 has one GT: slot 1 of every block is padding (zero content, zero logits)
    assert torch.all(dn.label_query[1, 1::2] == 0) and torch.all(dn.bbox_query[1, 1::2] == 0)
    assert torch.all(dn.label_query[1, 0::2] != 0)


def test_positive_noise_stays_within_one_box_size_and_negatives_beyond():
    torch.manual_seed(0)
    gen = make(num_dn_queries=200, label_noise=0.5, box_noise=1.0)
    box = torch.tensor([[40.0, 40.0, 60.0, 60.0]])
    dn = gen([box], [torch.tensor([0])], torch.tensor([[100, 100]]))
    noisy = cxcywh_to_xyxy(dn.bbox_query[0].sigmoid()) * 100  # (2G, 4)
    shift = (noisy - box).abs()
    positive, negative = shift[0::2], shift[1::2]
    # positives: every corner moves by |u| * w / 2 with |u| < 1 -> < 10 px (+ logit-eps rounding)
    assert positive.max() <= 10.0 + 0.2
    # negatives move each corner by 10-20 px, so they may invert; on average they move much further
    assert negative.mean() > 2 * positive.mean()


def test_attention_mask_isolates_groups_and_matching_queries():
    mask = make().attention_mask(max_gt=1, groups=2, device=torch.device("cpu"))
    assert mask.shape == (7, 7)
    assert mask[4:, :4].all() and not mask[4:, 4:].any()  # matching never sees DN, sees itself
    assert not mask[:2, :2].any() and mask[:2, 2:4].all() and mask[2:4, :2].all()  # groups isolated
    assert not mask[:4, 4:].any()  # DN sees matching


def test_no_ground_truth_gives_no_denoising_queries():
    dn = make()([torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], torch.tensor([[10, 10]]))
    assert dn.num_queries == 0 and dn.label_query.shape == (1, 0, 4) and dn.attn_mask.shape == (3, 3)
