"""Backbones: ResNet (oracle parity, R50 key layout, freezing, weight loading); Swin (mmdet / original naming
conversion, patch-merging channel order); ViT (shapes, RoPE / windows, checkpointing)."""

from __future__ import annotations

import time

import pytest
import torch
from backbone_oracle import oracle_load, r50_reference_shapes, tiny_backbone_neck

from codetr.checkpoint_io import UnsafeCheckpointError, load_weights_file, require_online
from codetr.models.backbones import ResNet


def test_resnet_tiny_matches_oracle():
    backbone, _ = tiny_backbone_neck()
    backbone.eval()
    inputs = oracle_load("tiny_inputs.pth")["inputs"]
    expected = oracle_load("tiny_intermediates.pth")["backbone.out"]
    with torch.no_grad():
        outs = backbone(inputs)
    assert [o.shape for o in outs] == [e.shape for e in expected]
    assert backbone.out_channels == [e.shape[1] for e in expected]
    errors = [(o - e).abs().max().item() for o, e in zip(outs, expected)]
    print("backbone max abs errors", errors)
    assert max(errors) <= 1e-4, errors


def test_resnet50_state_dict_matches_official_layout():
    ref = {k[len("backbone."):]: s for k, s in r50_reference_shapes().items() if k.startswith("backbone.")}
    model = ResNet(depth=50, base_channels=64)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == ref
    assert model.out_channels == [256, 512, 1024, 2048]
    assert sum(p.numel() for p in model.parameters()) == 23_508_032


def test_resnet_freezing_and_norm_eval():
    torch.manual_seed(0)
    model = ResNet(depth=50, base_channels=8, frozen_stages=1).train()
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert all(n.startswith(("conv1", "bn1", "layer1")) or ".bn" in n or "downsample.1" in n for n in frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(("conv1", "layer1")))
    assert all(p.requires_grad for n, p in model.named_parameters()
               if n.startswith("layer2") and ".conv" in n)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(not m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    outs = model(torch.randn(2, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(2, 32, 16, 24), (2, 64, 8, 12), (2, 128, 4, 6), (2, 256, 2, 3)]
    sum(o.mean() for o in outs).backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns))
    assert model.layer2[0].conv1.weight.grad is not None and model.conv1.weight.grad is None
    unfrozen = ResNet(depth=50, base_channels=8, frozen_stages=-1, norm_eval=False).train()
    assert all(p.requires_grad for n, p in unfrozen.named_parameters() if ".bn" not in n and n != "bn1.weight"
               and n != "bn1.bias" and "downsample.1" not in n)
    assert any(m.training for m in unfrozen.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_resnet_loads_local_weights_in_both_namings(tmp_path):
    torch.manual_seed(0)
    src = ResNet(depth=50, base_channels=8)
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x = torch.randn(1, 3, 32, 32)
    ref = src.eval()(x)
    # mmdet detector checkpoint: {"state_dict": {"backbone.*": ...}, "meta": ...}
    det = {"state_dict": {f"backbone.{k}": v for k, v in src.state_dict().items()}, "meta": {"epoch": 1}}
    det["state_dict"]["neck.convs.0.conv.weight"] = torch.zeros(1)
    torch.save(det, tmp_path / "det.pth")
    # torchvision ImageNet naming: no num_batches_tracked, plus the classifier
    tv = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    tv["fc.weight"], tv["fc.bias"] = torch.zeros(10, 256), torch.zeros(10)
    torch.save(tv, tmp_path / "tv.pth")
    for name in ("det.pth", "tv.pth"):
        model = ResNet(depth=50, base_channels=8, weights=tmp_path / name).eval()
        for a, b in zip(model(x), ref):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    bad = dict(tv)
    bad["layer9.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="layer9.weight"):
        ResNet(depth=50, base_channels=8, weights=tmp_path / "bad.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_weights_file_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        load_weights_file(path)
    with pytest.raises(UnsafeCheckpointError, match="evil.pth"):
        ResNet(depth=50, base_channels=8, weights=path)


def test_offline_download_fails_fast_with_clear_message():
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="not reachable"):
        require_online("https://codetr-no-such-host.invalid/weights.pth", timeout=2.0)
    assert time.monotonic() - start < 30
