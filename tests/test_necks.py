"""ChannelMapper (oracle parity, names, init) and SFP (shapes, names, checkpointing equivalence)."""

from __future__ import annotations

import torch
from backbone_oracle import oracle_load, r50_reference_shapes, tiny_backbone_neck

from codetr.models.necks import SFP, ChannelMapper


def test_channel_mapper_matches_oracle():
    backbone, neck = tiny_backbone_neck()
    backbone.eval(), neck.eval()
    inputs = oracle_load("tiny_inputs.pth")["inputs"]
    expected = oracle_load("tiny_intermediates.pth")["neck.out"]
    with torch.no_grad():
        outs = neck(backbone(inputs))
    assert len(outs) == len(expected)
    errors = [(o - e).abs().max().item() for o, e in zip(outs, expected)]
    for o, e in zip(outs, expected):
        assert o.shape == e.shape
    print("neck max abs errors", errors)
    assert max(errors) <= 1e-4, errors


def test_channel_mapper_state_dict_matches_r50_layout():
    ref = {k[len("neck."):]: s for k, s in r50_reference_shapes().items() if k.startswith("neck.")}
    neck = ChannelMapper([256, 512, 1024, 2048], 256, num_outs=5, num_groups=32)
    ours = {k: tuple(v.shape) for k, v in neck.state_dict().items()}
    assert ours == ref


def test_channel_mapper_extra_level_uses_raw_last_map_and_init():
    torch.manual_seed(0)
    neck = ChannelMapper([8, 16], 32, num_outs=4, num_groups=4)
    assert neck.extra_convs[0].conv.in_channels == 16 and neck.extra_convs[1].conv.in_channels == 32
    assert all(m.conv.bias is None for m in [*neck.convs, *neck.extra_convs])
    assert torch.equal(neck.convs[0].gn.weight, torch.ones(32)) and torch.equal(neck.convs[0].gn.bias, torch.zeros(32))
    w = neck.extra_convs[0].conv.weight
    bound = (6.0 / (w.shape[1] * 9 + w.shape[0] * 9)) ** 0.5  # xavier-uniform bound
    assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound
    feats = [torch.randn(2, 8, 16, 20), torch.randn(2, 16, 8, 10)]
    outs = neck(feats)
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 20), (2, 32, 8, 10), (2, 32, 4, 5), (2, 32, 2, 3)]
    manual = neck.extra_convs[0].gn(neck.extra_convs[0].conv(feats[1]))
    torch.testing.assert_close(outs[2], manual)


def test_sfp_shapes_names_and_layernorm():
    torch.manual_seed(0)
    neck = SFP(in_channels=[32], out_channels=16, num_outs=5, use_p2=True)
    x = torch.randn(2, 32, 9, 13)
    outs = neck([x])
    assert [tuple(o.shape[-2:]) for o in outs] == [(36, 52), (18, 26), (9, 13), (5, 7), (3, 4)]
    keys = set(neck.state_dict())
    # original-repo parameter positions inside the Sequentials
    for key in ["p2.1.weight", "p2.2.weight", "p2.5.weight", "p2.8.weight", "p2.11.weight", "p2.12.bias",
                "p3.1.weight", "p3.4.weight", "p3.7.weight", "p4.0.weight", "p4.3.weight", "p5.1.weight",
                "p5.4.weight", "p6.1.weight", "p6.2.weight", "p6.4.weight", "p6.7.weight", "p6.8.bias"]:
        assert key in keys, key
    assert all(m.bias is None for m in neck.modules() if isinstance(m, torch.nn.Conv2d))
    # every output ends with a channel LayerNorm: per-pixel mean 0 / var 1 with unit affine
    for o in outs:
        torch.testing.assert_close(o.mean(1), torch.zeros_like(o.mean(1)), atol=1e-5, rtol=0)
    # p4 by hand: 1x1 conv -> LN over C -> GELU -> 3x3 conv -> LN
    def ln(t):
        return torch.nn.functional.layer_norm(t.permute(0, 2, 3, 1), (t.shape[1],), eps=1e-6).permute(0, 3, 1, 2)
    p4 = neck.p4
    manual = ln(p4[3](torch.nn.functional.gelu(ln(p4[0](x)))))
    torch.testing.assert_close(outs[2], manual, atol=1e-5, rtol=1e-5)


def test_sfp_checkpointing_is_numerically_identical():
    torch.manual_seed(0)
    plain = SFP(16, 8, num_outs=4, use_p2=False)
    ckpt = SFP(16, 8, num_outs=4, use_p2=False, with_cp=True)
    ckpt.load_state_dict(plain.state_dict())
    x1 = torch.randn(1, 16, 6, 6, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    sum(o.square().sum() for o in plain([x1])).backward()
    sum(o.square().sum() for o in ckpt([x2])).backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (n, p), (_, q) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
