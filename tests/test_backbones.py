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


# ------------------------------------------------------------------------------------------------ Swin
def _small_swin(**kwargs):
    from codetr.models.backbones import SwinTransformer

    args = {"embed_dims": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 4,
            "drop_path_rate": 0.0, "pretrain_img_size": 64}
    args.update(kwargs)
    model = SwinTransformer(**args)
    if args.get("weights") is not None:
        return model
    with torch.no_grad():  # non-trivial norms / biases so that every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def test_swin_large_layout_matches_mmdet_key_table():
    from codetr.models.backbones import SwinTransformer
    from codetr.models.backbones.swin import swin_to_mmdet

    model = SwinTransformer()  # Swin-L defaults
    assert model.out_channels == [192, 384, 768, 1536]
    mm = swin_to_mmdet(model.state_dict())
    # the official Swin-L backbone state dict: 357 entries incl. 24 persistent relative_position_index buffers
    # (not kept by timm / us)
    assert len(mm) == 357 - 24
    shapes = {k: tuple(v.shape) for k, v in mm.items()}
    assert shapes["patch_embed.projection.weight"] == (192, 3, 4, 4)
    assert shapes["stages.2.blocks.17.attn.w_msa.qkv.weight"] == (3 * 768, 768)
    assert shapes["stages.3.blocks.1.attn.w_msa.relative_position_bias_table"] == (529, 48)
    assert shapes["stages.2.downsample.reduction.weight"] == (1536, 3072)
    assert shapes["stages.1.blocks.0.ffn.layers.0.0.weight"] == (1536, 384)
    assert shapes["norm3.weight"] == (1536,) and "stages.3.downsample.norm.weight" not in shapes
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0
             for s in model.layers for b in s.blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 24), atol=1e-6, rtol=0)


def test_swin_mmdet_and_original_naming_roundtrip(tmp_path):
    from timm.models.swin_transformer import get_relative_position_index

    from codetr.models.backbones.swin import swin_to_mmdet

    torch.manual_seed(0)
    model = _small_swin().eval()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        ref = model(x)
    mm = swin_to_mmdet(model.state_dict())
    for s in range(4):  # mmdet checkpoints carry the index buffers
        for j in range(2):
            mm[f"stages.{s}.blocks.{j}.attn.w_msa.relative_position_index"] = get_relative_position_index(4, 4)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in mm.items()}}, tmp_path / "mmdet.pth")
    # original naming: patch merging closes stage s (timm: opens stage s + 1), classifier norm / head present
    orig = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        if k.startswith("layers.") and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        orig[".".join(parts)] = v
    orig["norm.weight"], orig["head.weight"] = torch.ones(128), torch.zeros(5, 128)
    orig["layers.0.blocks.1.attn_mask"] = torch.zeros(1)
    torch.save({"model": orig}, tmp_path / "orig.pth")
    for name in ("mmdet.pth", "orig.pth"):
        torch.manual_seed(1)
        loaded = _small_swin(weights=tmp_path / name).eval()
        with torch.no_grad():
            outs = loaded(x)
        for a, b in zip(outs, ref):
            torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a stored index buffer that is not the standard table is reported instead of silently dropped
    mm["stages.0.blocks.0.attn.w_msa.relative_position_index"] = torch.zeros(16, 16, dtype=torch.long)
    torch.save(mm, tmp_path / "bad.pth")
    with pytest.raises(KeyError, match="not the standard relative position table"):
        _small_swin(weights=tmp_path / "bad.pth")


def test_swin_patch_merging_permutation_against_unfold():
    """mmdet merges 2x2 neighbours with nn.Unfold (channel-major, kernel row-major); timm / original concatenate
    x0 (even h, even w), x1 (odd h, even w), x2 (even h, odd w), x3. The converted weights must agree."""
    from timm.models.swin_transformer import PatchMerging

    from codetr.models.backbones.swin import merge_original_to_unfold, merge_unfold_to_original

    torch.manual_seed(0)
    c = 6
    merge = PatchMerging(c)
    with torch.no_grad():
        merge.norm.weight.normal_(), merge.norm.bias.normal_()
    x = torch.randn(2, 8, 10, c)
    w_mm = merge_original_to_unfold(merge.reduction.weight)
    g_mm, b_mm = merge_original_to_unfold(merge.norm.weight), merge_original_to_unfold(merge.norm.bias)
    cols = torch.nn.functional.unfold(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).transpose(1, 2)
    ref = torch.nn.functional.linear(torch.nn.functional.layer_norm(cols, (4 * c,), g_mm, b_mm), w_mm)
    ours = merge(x).reshape(2, -1, 2 * c)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merge_unfold_to_original(w_mm), merge.reduction.weight)
    assert not torch.equal(w_mm, merge.reduction.weight)


def test_swin_matches_timm_forward_when_windows_tile_the_map():
    """With maps that are multiples of the window (no padding) our detection windowing equals timm's forward."""
    torch.manual_seed(0)
    model = _small_swin().eval()
    x = torch.randn(1, 3, 128, 128)  # stage maps 32, 16, 8, 4 = multiples of window 4
    with torch.no_grad():
        ours = model(x)
        t = model.patch_embed(x)
        for s, stage in enumerate(model.layers):
            t = stage(t)
            torch.testing.assert_close(ours[s], getattr(model, f"norm{s}")(t).permute(0, 3, 1, 2),
                                       atol=1e-5, rtol=1e-5)


def test_swin_padding_shapes_and_checkpointing():
    torch.manual_seed(0)
    model = _small_swin(drop_path_rate=0.0)
    ckpt = _small_swin(with_cp=True)
    ckpt.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 37, 50)  # not a multiple of the patch nor of the window
    outs = model.train()(x)
    assert [tuple(o.shape) for o in outs] == [(1, 16, 10, 13), (1, 32, 5, 7), (1, 32 * 2, 3, 4), (1, 128, 2, 2)]
    sum(o.square().mean() for o in outs).backward()
    sum(o.square().mean() for o in ckpt.train()(x)).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n, atol=1e-6, rtol=1e-5)
    assert all(torch.isfinite(o).all() for o in outs)


# ------------------------------------------------------------------------------------------------ ViT
def _small_vit(**kwargs):
    from codetr.models.backbones import ViT

    args = {"img_size": 128, "embed_dim": 32, "depth": 4, "num_heads": 2, "window_size": 3,
            "global_attn_indexes": (1, 3), "pretrain_img_size": 64, "drop_path_rate": 0.0}
    args.update(kwargs)
    return ViT(**args)


def test_vit_rope_table_matches_formula():
    import math

    from codetr.models.backbones.vit import apply_rope, rope_table

    rows, cols, head_dim = 3, 5, 8
    cos, sin = rope_table(rows, cols, head_dim, pt_seq_len=16, theta=10000.0)
    for r in range(rows):
        for c in range(cols):
            for d in range(head_dim):
                pair = (d % (head_dim // 2)) // 2
                pos = (r / rows if d < head_dim // 2 else c / cols) * 16
                angle = pos * 10000.0 ** (-2 * pair / (head_dim // 2))
                assert math.isclose(cos[r * cols + c, d].item(), math.cos(angle), abs_tol=1e-5)
                assert math.isclose(sin[r * cols + c, d].item(), math.sin(angle), abs_tol=1e-5)
    x = torch.randn(rows * cols, head_dim)
    y = apply_rope(x, cos, sin)
    a = torch.atan2(sin[:, ::2], cos[:, ::2])
    torch.testing.assert_close(y[:, ::2], x[:, ::2] * a.cos() - x[:, 1::2] * a.sin())
    torch.testing.assert_close(y[:, 1::2], x[:, 1::2] * a.cos() + x[:, ::2] * a.sin())
    # a rotation: norms kept, and q.k after RoPE depends only on the position difference along an axis
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))


def test_vit_window_blocks_are_local_and_global_blocks_are_not():
    from codetr.models.backbones.vit import ViTBlock, rope_table

    torch.manual_seed(0)
    window, full = ViTBlock(16, 2, 8 / 3, 0.0, window_size=3), ViTBlock(16, 2, 8 / 3, 0.0, window_size=0)
    x = torch.randn(1, 5, 7, 16)  # padded to 6 x 9 inside the window block
    x2 = x.clone()
    x2[:, 4, 5] += torch.randn(16)  # window rows 3..5, cols 3..5 (a constant shift would vanish in norm1)
    w_cos, w_sin = rope_table(3, 3, 8)
    g_cos, g_sin = rope_table(5, 7, 8)
    with torch.no_grad():
        a, b = window(x, w_cos, w_sin), window(x2, w_cos, w_sin)
        changed = (a - b).abs().amax(-1) > 0
        assert changed[0, 3:, 3:6].all()
        assert not changed[0, :3].any() and not changed[0, :, :3].any() and not changed[0, :, 6:].any()
        a, b = full(x, g_cos, g_sin), full(x2, g_cos, g_sin)
        assert ((a - b).abs().amax(-1) > 1e-6).all()


def test_vit_shapes_names_and_large_layout():
    from codetr.models.backbones import ViT

    torch.manual_seed(0)
    model = _small_vit().eval()
    outs = model(torch.randn(2, 3, 80, 112))
    assert len(outs) == 1 and outs[0].shape == (2, 32, 5, 7) and model.out_channels == [32]
    assert [b.window_size for b in model.blocks] == [3, 0, 3, 0]
    with torch.device("meta"):
        large = ViT()
    shapes = {k: tuple(v.shape) for k, v in large.state_dict().items()}
    assert shapes["pos_embed"] == (1, 1 + 32 * 32, 1024)
    assert shapes["patch_embed.proj.weight"] == (1024, 3, 16, 16)
    assert shapes["blocks.0.attn.q_proj.weight"] == (1024, 1024) and "blocks.0.attn.q_proj.bias" not in shapes
    assert shapes["blocks.0.attn.q_bias"] == (1024,) and "blocks.0.attn.k_bias" not in shapes
    assert shapes["blocks.23.mlp.w1.weight"] == (2730, 1024) and shapes["blocks.23.mlp.ffn_ln.weight"] == (2730,)
    assert shapes["blocks.23.mlp.w3.weight"] == (1024, 2730) and shapes["out_norm.weight"] == (1024,)
    assert [i for i, b in enumerate(large.blocks) if b.window_size == 0] == [3, 7, 11, 15, 19, 23]
    per_block = 4 * 1024 * 1024 + 1024 + 2 * 1024 + 4 * 1024 + 2 * (2730 * 1024 + 2730) + 2 * 2730 + 1024 * 2730 + 1024
    assert sum(p.numel() for p in large.parameters()) == 24 * per_block + 1025 * 1024 + 3 * 256 * 1024 + 1024 + 2048
    with pytest.raises(ValueError, match="use_lsj"):
        _small_vit(use_lsj=True)(torch.randn(1, 3, 64, 64))
    assert _small_vit(use_lsj=True)(torch.randn(1, 3, 128, 128))[0].shape == (1, 32, 8, 8)


def test_vit_loading_and_checkpointing(tmp_path):
    torch.manual_seed(0)
    model = _small_vit()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model.eval()(x)[0]
        torch.testing.assert_close(model.abs_pos(4, 4), model.pos_embed[:, 1:].reshape(1, 4, 4, -1))
    state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
    state["module.backbone.rope_win.freqs_cos"] = torch.zeros(9, 16)  # original persistent RoPE buffers
    state["module.backbone.blocks.0.attn.rope.freqs_sin"] = torch.zeros(9, 16)
    torch.save({"state_dict": state}, tmp_path / "vit.pth")
    loaded = _small_vit(weights=tmp_path / "vit.pth").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], ref, atol=0, rtol=0)
    # EVA-02 pre-training file: patch 14 and a 16 x 16 position grid -> resampled to patch 16 / 4 x 4 grid
    eva = {k: v for k, v in model.state_dict().items()}
    eva["patch_embed.proj.weight"] = torch.randn(32, 3, 14, 14)
    eva["pos_embed"] = torch.randn(1, 1 + 16 * 16, 32)
    eva["head.weight"] = torch.zeros(10, 32)
    torch.save(eva, tmp_path / "eva.pth")
    resampled = _small_vit(weights=tmp_path / "eva.pth")
    assert resampled.patch_embed.proj.weight.shape == (32, 3, 16, 16) and resampled.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(resampled.pos_embed[:, 0], eva["pos_embed"][:, 0])
    # activation checkpointing: same gradients
    ckpt = _small_vit(use_checkpoint=True)
    ckpt.load_state_dict(model.state_dict())
    model.train()(x)[0].square().mean().backward()
    ckpt.train()(x)[0].square().mean().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_swin_shifted_window_attention_pads_before_shifting():
    """Per-token reference of the detection Swin (mmdet / original): pad the map bottom/right to a multiple of the
    window, roll by -shift, attend within windows with the relative position bias, -100 between tokens of
    different shift regions, roll back, crop. Padding tokens are zeros that act as keys."""
    torch.manual_seed(0)
    model = _small_swin().eval()
    block = model.layers[0].blocks[1]
    ws, shift, heads = 4, 2, block.attn.num_heads
    h, w, c = 5, 7, 16
    y = torch.randn(1, h, w, c)
    hp, wp = 8, 8
    padded = torch.zeros(hp, wp, c)
    padded[:h, :w] = y[0]
    shifted = torch.roll(padded, shifts=(-shift, -shift), dims=(0, 1))
    bias = block.attn._get_rel_pos_bias()[0]  # (heads, ws*ws, ws*ws)

    def region(i, n):
        return 0 if i < n - ws else (1 if i < n - shift else 2)

    qkv = block.attn.qkv(shifted).reshape(hp, wp, 3, heads, -1)
    head_dim = qkv.shape[-1]
    out = torch.zeros(hp, wp, c)
    for i in range(hp):
        for j in range(wp):
            keys = [
                (a, b) for a in range(i // ws * ws, i // ws * ws + ws) for b in range(j // ws * ws, j // ws * ws + ws)
            ]
            q_idx = (i % ws) * ws + j % ws
            per_head = []
            for hd in range(heads):
                logits = torch.stack([
                    (qkv[i, j, 0, hd] * qkv[a, b, 1, hd]).sum() * head_dim**-0.5
                    + bias[hd, q_idx, (a % ws) * ws + b % ws]
                    + (0.0 if (region(a, hp), region(b, wp)) == (region(i, hp), region(j, wp)) else -100.0)
                    for a, b in keys
                ])
                weights = logits.softmax(0)
                per_head.append(sum(wgt * qkv[a, b, 2, hd] for wgt, (a, b) in zip(weights, keys)))
            out[i, j] = block.attn.proj(torch.cat(per_head))
    expected = torch.roll(out, shifts=(shift, shift), dims=(0, 1))[:h, :w]
    with torch.no_grad():
        ours = model._window_attention(block, y, shift)[0]
    torch.testing.assert_close(ours, expected.detach(), atol=1e-5, rtol=1e-4)


def test_resnet_download_fails_fast_offline(monkeypatch, tmp_path):
    from codetr.models.backbones.pretrained import PretrainedWeightsUnavailable

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache: the file must be downloaded
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match="not reachable"):
        ResNet(depth=50, base_channels=8, weights="https://codetr-no-such-host.invalid/resnet50-unknown.pth")
    assert time.monotonic() - start < 30


def test_vit_loads_timm_eva_naming(tmp_path):
    """timm's EVA-02 blocks (``qkv_fused=False``, SwiGLU with sub-LN) map onto ours: same attention (RoPE off) and
    same MLP outputs after loading."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    eva = Eva(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=8 / 3, qkv_fused=False,
              swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), num_classes=0).eval()
    with torch.no_grad():
        for name, p in eva.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_()
    torch.save({"model": eva.state_dict()}, tmp_path / "eva_timm.pth")
    ours = _small_vit(depth=2, global_attn_indexes=(0, 1), weights=tmp_path / "eva_timm.pth").eval()
    x = torch.randn(2, 6, 32)
    ones, zeros = torch.ones(6, 16), torch.zeros(6, 16)  # identity RoPE
    with torch.no_grad():
        for theirs, mine in zip(eva.blocks, ours.blocks):
            torch.testing.assert_close(mine.mlp(x), theirs.mlp(x))
            torch.testing.assert_close(mine.attn(x, ones, zeros), theirs.attn(x), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mine.norm1(x), theirs.norm1(x))
    torch.testing.assert_close(ours.pos_embed, eva.pos_embed)
