"""``trainer.precision=bf16-mixed`` on the CPU.

* The strided convolutions of the neck and the query head (the auxiliary pyramid's ``downsample``) give the float32
  weight gradient under bf16 autocast also on one-pixel-wide maps, which the stride-64 level of small images is:
  oneDNN's bf16 kernel returns garbage there on CPUs with native bf16 (AVX512-BF16), see
  :mod:`codetr.models.safe_conv`; the non-finite guard skipped the steps where the garbage was inf / NaN. CPUs
  without native bf16 run a correct kernel, so there the test checks that the float32 path is taken (output dtype)
  and that autocast rounds to bf16 elsewhere; without the guard it fails on both kinds.
* The forward of a strided convolution whose OUTPUT is one column wide (inputs one or two columns wide) is float32
  too: on Intel AMX-BF16 CPUs oneDNN's bf16 forward returns NaN there with 256+ channels (the tiny model's 512-channel
  C5 -> extra neck level of a 64 px image); elsewhere the test checks the path taken (output dtype).
* End to end: the tiny Co-DINO (all auxiliary heads, denoising; 48-64 pixel images, so the coarsest levels are one
  pixel wide) trains 40 optimiser steps with every loss term finite at every step, no step skipped by the
  non-finite guard, and a falling loss.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from codetr.models.backbones.resnet import ResNet
from codetr.models.heads.co_dino_head import CoDINOHead
from codetr.models.necks import SFP, ChannelMapper
from codetr.models.safe_conv import SafeStridedConv2d
from codetr.models.transformer.dino_transformer import DinoTransformer
from codetr.train import train

STEPS = 40


def weight_gradient(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, bf16: bool) -> torch.Tensor:
    conv.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = conv(x)
    out.backward(grad.to(out.dtype))
    return conv.weight.grad.clone()


def strided_convs(module: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Conv2d) and max(m.stride) > 1]


@pytest.mark.parametrize("height", [1, 2, 5])
def test_strided_conv_weight_gradient_under_bf16_autocast_matches_float32_on_one_pixel_wide_maps(height):
    torch.manual_seed(0)
    conv = SafeStridedConv2d(64, 64, 3, stride=2, padding=1)
    for _ in range(5):  # the broken kernel is wrong on most calls, not all
        x = torch.randn(2, 64, height, 1)
        grad = torch.randn(2, 64, (height + 1) // 2, 1)
        expected = weight_gradient(conv, x, grad, bf16=False)
        got = weight_gradient(conv, x, grad, bf16=True)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # On every CPU (the broken kernel exists only with native bf16): the one-wide map takes the float32 path, wider
    # maps the bf16 one, so autocast really rounds here too.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(torch.randn(1, 64, height, 1)).dtype == torch.float32
        assert conv(torch.randn(1, 64, 4, 4)).dtype == torch.bfloat16
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


@pytest.mark.parametrize("width", [1, 2])
def test_strided_conv_forward_under_bf16_autocast_is_finite_and_float32_when_the_output_is_one_pixel_wide(width):
    torch.manual_seed(0)
    conv = SafeStridedConv2d(256, 256, 3, stride=2, padding=1)
    x = torch.randn(2, 256, 8, width)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x)
    assert out.shape[-1] == 1 and out.dtype == torch.float32
    torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wider = conv(torch.randn(2, 256, 8, 4))
    assert wider.shape[-1] == 2 and wider.dtype == torch.bfloat16


def test_every_strided_conv_of_the_resnet_necks_and_query_head_is_guarded():
    transformer = DinoTransformer(embed_dims=64, num_heads=4, num_levels=2, num_points=1, num_encoder_layers=1,
                                  num_decoder_layers=1, ffn_dims=64, num_queries=10, num_co_heads=2)
    modules = {"neck": ChannelMapper([32, 64, 128, 256], 64, 6), "sfp": SFP(64, 32),
               "query_head": CoDINOHead(2, transformer), "resnet": ResNet(depth=50, base_channels=16)}
    found = [(owner, name, type(conv)) for owner, module in modules.items() for name, conv in strided_convs(module)]
    assert {owner for owner, _, _ in found} == {"neck", "sfp", "query_head", "resnet"}
    assert [item for item in found if item[2] is not SafeStridedConv2d] == []


@pytest.mark.slow
def test_bf16_mixed_trains_without_nonfinite_losses_or_skipped_steps(compose_cfg):
    cfg = compose_cfg("train", [
        "experiment=demo", "data.generate.num_train=16", "data.generate.num_val=4", "data.generate.image_size=64",
        "data.batch_size=2", "aug.scales=[64]", "aug.crop_scales=[64]", "aug.crop_size=[48,64]", "aug.test_scale=64",
        "callbacks=none", "logger=csv", "trainer.precision=bf16-mixed", "trainer.max_epochs=-1",
        f"+trainer.max_steps={STEPS}", "+trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
    ])
    train(cfg)
    rows = list(csv.DictReader(next(Path(cfg.paths.output_dir).glob("csv/**/metrics.csv")).open()))
    losses = [float(row["train/loss_step"]) for row in rows if row.get("train/loss_step")]
    assert len(losses) == STEPS
    terms = [(row["step"], key, float(value)) for row in rows for key, value in row.items()
             if key.startswith("train/") and "loss" in key and value]
    assert len(terms) > 30 * STEPS  # every term of every step was logged
    assert [t for t in terms if not math.isfinite(t[2])] == []
    assert not any(row.get("train/skipped_steps") for row in rows)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:5]) / 5
