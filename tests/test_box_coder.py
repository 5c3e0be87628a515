"""DeltaXYWH box coder: hand-computed deltas, round trip, wh clamp and border clipping."""

from __future__ import annotations

import math

import torch

from codetr.models.box_coder import DeltaXYWHBoxCoder


def test_encode_hand_case_with_stds():
    coder = DeltaXYWHBoxCoder(stds=(0.1, 0.1, 0.2, 0.2))
    prior = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[5.0, 5.0, 25.0, 15.0]])  # centre (15, 10), size 20 x 10
    deltas = coder.encode(prior, gt)
    torch.testing.assert_close(deltas, torch.tensor([[10.0, 5.0, math.log(2) / 0.2, 0.0]]))


def test_round_trip():
    gen = torch.Generator().manual_seed(0)
    xy = torch.rand(50, 2, generator=gen) * 100
    priors = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=gen) * 50], 1)
    xy = torch.rand(50, 2, generator=gen) * 100
    gts = torch.cat([xy, xy + 5 + torch.rand(50, 2, generator=gen) * 50], 1)
    for stds in [(1.0, 1.0, 1.0, 1.0), (0.1, 0.1, 0.2, 0.2)]:
        coder = DeltaXYWHBoxCoder(stds=stds)
        torch.testing.assert_close(coder.decode(priors, coder.encode(priors, gts)), gts, rtol=0, atol=1e-4)


def test_decode_clamps_size_change():
    coder = DeltaXYWHBoxCoder()
    prior = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    out = coder.decode(prior, torch.tensor([[0.0, 0.0, 100.0, -100.0]]))
    w = 10 * 1000 / 16  # exp(|log(16 / 1000)|)
    h = 10 * 16 / 1000
    torch.testing.assert_close(out, torch.tensor([[5 - w / 2, 5 - h / 2, 5 + w / 2, 5 + h / 2]]))


def test_decode_clips_to_image_only_when_asked():
    coder = DeltaXYWHBoxCoder()
    prior = torch.tensor([[-10.0, -10.0, 30.0, 50.0]])
    deltas = torch.zeros(1, 4)
    torch.testing.assert_close(coder.decode(prior, deltas), prior)
    torch.testing.assert_close(
        coder.decode(prior, deltas, max_shape=(40, 20)), torch.tensor([[0.0, 0.0, 20.0, 40.0]])
    )


def test_decode_empty():
    assert DeltaXYWHBoxCoder().decode(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0, 4)
