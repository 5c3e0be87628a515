"""Pretrained backbone sources, offline: files in each source's own key format (torchvision ResNet-50, the official
Swin release, timm's Swin, EVA-02's own ViT files) load with every key accounted for; the caches (paths.weights_dir,
$TORCH_HOME/hub/checkpoints, the Hugging Face cache) are searched before any download; an offline machine without
the file stops before training with a message naming the file, where to put it and the config key; frozen stages
keep their pretrained values. The fixtures are randomly initialised models of each source's architecture (torchvision,
timm), re-keyed to the source's format; timm's own converters confirm that the re-keyed files are that format."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from codetr.models.backbones import ResNet, SwinTransformer, ViT
from codetr.models.backbones import pretrained as pretrained_mod
from codetr.models.backbones.pretrained import PretrainedWeightsUnavailable, parse_source, resolve_weights

R50_SOURCE = "torchvision://resnet50"
R50_FILE = "resnet50-0676ba61.pth"
SWIN_L_SOURCE = ("https://github.com/SwinTransformer/storage/releases/download/v1.0.0/"
                 "swin_large_patch4_window12_384_22k.pth")
EVA_SOURCE = "hf://Yuxin-CV/EVA-02/eva02/pt/eva02_L_pt_m38m_p14to16.pt"


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """Empty torch.hub and Hugging Face caches under tmp_path; every download function raises."""
    import huggingface_hub.constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))

    def no_network(*args, **kwargs):
        raise RuntimeError("cannot download: the host is not reachable (test: no network)")

    monkeypatch.setattr(pretrained_mod, "require_online", no_network)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no_network)
    return tmp_path


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and float buffer random, so that a value that was not loaded cannot match by chance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.5 + 0.5 if tensor.dim() == 1 else
                             torch.randn(tensor.shape, generator=g) * 0.05)
    return module


# ----------------------------------------------------------------------------------------- ResNet-50 (torchvision)
@pytest.fixture(scope="module")
def torchvision_r50(tmp_path_factory) -> tuple[torch.nn.Module, dict, object]:
    """A random torchvision ResNet-50 and its ImageNet-file form (no ``num_batches_tracked`` buffers, which
    torchvision's files lack), saved once for the module: ``(net, state, path)``."""
    from torchvision.models import resnet50

    net = _randomise(resnet50()).eval()
    state = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path_factory.mktemp("torchvision") / R50_FILE
    torch.save(state, path)
    return net, state, path


def _place(path, folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / path.name).symlink_to(path)


def test_torchvision_resnet50_file_from_torch_hub_cache_loads_every_key(offline, torchvision_r50):
    torchvision_net, state, path = torchvision_r50
    _place(path, offline / "torch" / "hub" / "checkpoints")
    assert parse_source(R50_SOURCE).filename == R50_FILE
    model = ResNet(depth=50, base_channels=64, weights=None)
    ignored = model.load_weights(R50_SOURCE)
    assert ignored == ["fc.weight", "fc.bias"]  # the ImageNet classifier, nothing else
    ours = model.state_dict()
    assert set(ours) - set(state) == {k for k in ours if k.endswith("num_batches_tracked")}
    assert set(state) - set(ours) == set(ignored)
    for key, value in ours.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(value, state[key]), key
    assert torch.equal(model.layer3[5].conv2.weight, torchvision_net.layer3[5].conv2.weight)
    # same network: C5 equals torchvision's trunk output
    x = torch.randn(1, 3, 64, 64)
    trunk = torch.nn.Sequential(*list(torchvision_net.children())[:-2])
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x)[-1], trunk(x), atol=1e-5, rtol=1e-5)


def test_frozen_stages_keep_the_pretrained_values_after_a_step(offline, torchvision_r50):
    _, state, path = torchvision_r50
    _place(path, offline / "weights")
    cached = resolve_weights(R50_SOURCE, offline / "weights")
    assert cached == offline / "weights" / R50_FILE
    model = ResNet(depth=50, base_channels=64, frozen_stages=1, weights=cached).train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith(("conv1", "bn1", "layer1"))}
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert all(torch.equal(v, state[n]) for n, v in frozen.items())  # pretrained, not initial, values
    stats = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
    trained = model.layer2[0].conv1.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sum(o.square().mean() for o in model(torch.randn(1, 3, 32, 32))).backward()
    optimizer.step()
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) and not params[n].requires_grad for n, v in frozen.items())
    assert all(torch.equal(b, stats[n]) for n, b in model.named_buffers() if n in stats)  # BN in eval mode
    assert not torch.equal(model.layer2[0].conv1.weight, trained)


# ------------------------------------------------------------------------------------------------------ Swin
SMALL_SWIN = {"embed_dims": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 2, 4), "window_size": 4,
              "drop_path_rate": 0.0, "pretrain_img_size": 64}


def _timm_swin():
    from timm.models.swin_transformer import SwinTransformer as TimmSwin

    # 128 px: the last stage's map (4 x 4) is not smaller than the window, so timm keeps window 4 everywhere
    net = TimmSwin(img_size=128, patch_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                   window_size=4, num_classes=5)
    return _randomise(net, seed=1).eval()


def _official_swin_file(timm_net) -> dict:
    """The released Swin files' format: ``{"model": ...}``, patch merging closing stage s, ``relative_position_index``
    and ``attn_mask`` buffers, classifier ``norm`` / ``head``."""
    from timm.models.swin_transformer import checkpoint_filter_fn, get_relative_position_index

    original = {}
    for key, value in timm_net.state_dict().items():
        parts = key.split(".")
        if key.startswith("layers.") and parts[2] == "downsample":
            parts[1] = str(int(parts[1]) - 1)
        original[".".join(parts).replace("head.fc.", "head.")] = value
    for s in range(4):
        for j in range(2):
            original[f"layers.{s}.blocks.{j}.attn.relative_position_index"] = get_relative_position_index(4, 4)
        original[f"layers.{s}.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    # timm's own converter of the released files takes this back to the timm model's state dict exactly
    back = checkpoint_filter_fn({"model": original}, timm_net)
    assert back.keys() == timm_net.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in timm_net.state_dict().items())
    return {"model": original}


def test_official_swin_release_file_loads_every_key(offline):
    timm_net = _timm_swin()
    cache = offline / "torch" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(_official_swin_file(timm_net), cache / "swin_large_patch4_window12_384_22k.pth")
    model = SwinTransformer(**SMALL_SWIN)
    ignored = model.load_weights(SWIN_L_SOURCE)
    assert sorted(k for k in ignored if "relative_position_index" not in k and "attn_mask" not in k) == [
        "head.bias", "head.weight", "norm.bias", "norm.weight"]
    reference = timm_net.state_dict()
    ours = model.state_dict()
    assert set(ours) - set(reference) == {f"norm{s}.{p}" for s in range(4) for p in ("weight", "bias")}
    assert set(reference) - set(ours) == {"norm.weight", "norm.bias", "head.fc.weight", "head.fc.bias"}
    assert all(torch.equal(ours[k], reference[k]) for k in ours if k in reference)
    # the patch merging that closes stage 0 in the release opens stage 1 here
    assert torch.equal(model.layers[1].downsample.reduction.weight,
                       torch.load(cache / "swin_large_patch4_window12_384_22k.pth")["model"][
                           "layers.0.downsample.reduction.weight"])


def test_timm_swin_file_in_weights_dir_loads_every_key(offline):
    from safetensors.torch import save_file

    timm_net = _timm_swin()
    spec = "timm://swin_tiny_patch4_window7_224.ms_in1k"
    (offline / "weights").mkdir()
    save_file(timm_net.state_dict(), str(offline / "weights" / "swin_tiny_patch4_window7_224.ms_in1k.safetensors"))
    model = SwinTransformer(**SMALL_SWIN)
    assert sorted(model.load_weights(spec, offline / "weights")) == ["head.fc.bias", "head.fc.weight",
                                                                     "norm.bias", "norm.weight"]
    reference = timm_net.state_dict()
    ours = model.state_dict()
    assert all(torch.equal(ours[k], reference[k]) for k in ours if not k[:5] in {"norm0", "norm1", "norm2", "norm3"})
    assert torch.equal(model.layers[2].blocks[1].attn.relative_position_bias_table,
                       timm_net.layers[2].blocks[1].attn.relative_position_bias_table)


# ------------------------------------------------------------------------------------------------------- ViT
def _timm_eva():
    from timm.models.eva import Eva

    net = Eva(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, mlp_ratio=8 / 3, qkv_fused=False,
              swiglu_mlp=True, scale_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), num_classes=0)
    return _randomise(net, seed=2).eval()


def _eva02_own_file(eva) -> dict:
    """EVA-02's own MIM pre-training format (``eva02_L_pt_m38m_p14to16.pt``): ``{"model": ...}`` with
    ``attn.q_proj`` / ``q_bias`` / ``v_bias``, ``mlp.w1`` / ``w2`` / ``ffn_ln`` / ``w3``, final ``norm``,
    ``mask_token``, ``lm_head`` and RoPE buffers."""
    from timm.models.eva import checkpoint_filter_fn

    renames = [("mlp.fc1_g.", "mlp.w1."), ("mlp.fc1_x.", "mlp.w2."), ("mlp.fc2.", "mlp.w3."),
               ("mlp.norm.", "mlp.ffn_ln."), ("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"),
               ("fc_norm.", "norm.")]
    own = {}
    for key, value in eva.state_dict().items():
        for old, new in renames:
            key = key.replace(old, new)
        own[key] = value
    g = torch.Generator().manual_seed(3)
    own["mask_token"] = torch.randn(1, 1, 32, generator=g)
    own["lm_head.weight"], own["lm_head.bias"] = torch.randn(16, 32, generator=g), torch.randn(16, generator=g)
    for prefix in ("", "blocks.0.attn.", "blocks.1.attn."):  # one RoPE module, shared by the blocks' attention
        own[f"{prefix}rope.freqs_cos"], own[f"{prefix}rope.freqs_sin"] = torch.ones(16, 16), torch.zeros(16, 16)
    back = checkpoint_filter_fn({"model": own}, eva)  # timm's converter of EVA-02's files agrees
    assert back.keys() == eva.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in eva.state_dict().items())
    return {"model": own}


def _put_in_hf_cache(root, repo: str, filename: str, obj) -> None:
    snapshot = root / f"models--{repo.replace('/', '--')}" / "snapshots" / "0123abc"
    (snapshot / filename).parent.mkdir(parents=True)
    torch.save(obj, snapshot / filename)
    (root / f"models--{repo.replace('/', '--')}" / "refs").mkdir()
    (root / f"models--{repo.replace('/', '--')}" / "refs" / "main").write_text("0123abc")


def test_eva02_file_from_hugging_face_cache_loads_every_key(offline):
    eva = _timm_eva()
    own = _eva02_own_file(eva)
    _put_in_hf_cache(offline / "hf", "Yuxin-CV/EVA-02", "eva02/pt/eva02_L_pt_m38m_p14to16.pt", own)
    model = ViT(img_size=64, patch_size=16, embed_dim=32, depth=2, num_heads=2, window_size=2,
                global_attn_indexes=(1,), drop_path_rate=0.0, pretrain_img_size=64)
    ignored = model.load_weights(EVA_SOURCE)
    assert sorted(k for k in ignored if "rope." not in k) == ["cls_token", "lm_head.bias", "lm_head.weight",
                                                             "mask_token", "norm.bias", "norm.weight"]
    assert len([k for k in ignored if "rope." in k]) == 6
    ours = model.state_dict()
    assert set(ours) - set(own["model"]) == {"out_norm.weight", "out_norm.bias"}
    assert set(own["model"]) - set(ours) == set(ignored)
    assert all(torch.equal(ours[k], own["model"][k]) for k in ours if not k.startswith("out_norm"))
    assert torch.equal(model.blocks[1].mlp.w1.weight, eva.blocks[1].mlp.fc1_g.weight)
    assert torch.equal(model.blocks[0].attn.q_bias, eva.blocks[0].attn.q_proj.bias)


# ------------------------------------------------------------------------------------------------- offline
@pytest.mark.parametrize(("spec", "filename"), [
    (R50_SOURCE, R50_FILE),
    (SWIN_L_SOURCE, "swin_large_patch4_window12_384_22k.pth"),
    (EVA_SOURCE, "eva02_L_pt_m38m_p14to16.pt"),
    ("timm://swin_base_patch4_window12_384.ms_in22k", "swin_base_patch4_window12_384.ms_in22k.safetensors"),
])
def test_offline_without_the_file_names_it_where_to_put_it_and_the_key(offline, spec, filename):
    with pytest.raises(PretrainedWeightsUnavailable) as error:
        resolve_weights(spec, offline / "weights")
    message = str(error.value)
    assert filename in message and str(offline / "weights" / filename) in message
    assert str(offline / "torch" / "hub" / "checkpoints") in message
    assert "model.detector.backbone.weights=/path/to/" + filename in message
    assert "model.detector.backbone.weights=null" in message and "not reachable" in message
    assert parse_source(spec).download_url in message


def test_training_stops_before_anything_is_built_when_the_backbone_file_is_missing(offline, compose_cfg):
    from codetr.train import train

    cfg = compose_cfg("train", ["backbone=r50", f"paths.weights_dir={offline / 'weights'}",
                                f"paths.data_dir={offline / 'no_data'}"])
    with pytest.raises(PretrainedWeightsUnavailable, match=R50_FILE):
        train(cfg)  # the COCO files are missing too: the pretrained check comes first


def test_entry_points_resolve_cached_files_skip_replaced_backbones_and_warn_about_scratch(offline, compose_cfg, caplog):
    from codetr.train import fetch_backbone_weights

    (offline / "weights").mkdir()
    (offline / "weights" / R50_FILE).write_bytes(b"")
    cfg = compose_cfg("train", ["backbone=r50", f"paths.weights_dir={offline / 'weights'}"])
    fetch_backbone_weights(cfg)
    assert cfg.model.detector.backbone.weights == str(offline / "weights" / R50_FILE)
    # detector weights replace the whole backbone: nothing is looked up (the offline machine does not fail)
    cfg = compose_cfg("train", ["backbone=swin_l", "weights=converted.pth"])
    fetch_backbone_weights(cfg)
    assert cfg.model.detector.backbone.weights is None
    cfg = compose_cfg("evaluate", ["experiment=co_dino_r50_lsj_1x", "ckpt_path=model.ckpt"])  # as evaluate() does
    fetch_backbone_weights(cfg)
    assert cfg.model.detector.backbone.weights is None
    cfg = compose_cfg("train", ["backbone=vit_l", "model.detector.backbone.weights=null"])
    with caplog.at_level(logging.WARNING, logger="codetr.train"):
        fetch_backbone_weights(cfg)
    assert "model.detector.backbone.weights=null" in caplog.text and "random weights" in caplog.text


def test_every_recipe_backbone_defaults_to_its_pretrained_source(compose_cfg):
    expected = {"r50": R50_FILE, "swin_l": "swin_large_patch4_window12_384_22k.pth",
                "vit_l": "eva02_L_pt_m38m_p14to16.pt", "swin_t": "swin_tiny_patch4_window7_224.pth",
                "swin_s": "swin_small_patch4_window7_224.pth", "swin_b": "swin_base_patch4_window12_384_22k.pth"}
    for backbone, filename in expected.items():
        spec = compose_cfg("train", [f"backbone={backbone}"]).model.detector.backbone.weights
        assert parse_source(spec).filename == filename, backbone
    experiments = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))
    for experiment in experiments:
        spec = compose_cfg("train", [f"experiment={experiment}"]).model.detector.backbone.weights
        if experiment.startswith("demo"):  # the tiny CPU models have no pretrained source
            assert spec is None
        else:
            assert parse_source(spec) is not None, experiment
    assert compose_cfg("train", ["experiment=co_dino_swin_l_lsj_3x"]).model.detector.backbone.weights == SWIN_L_SOURCE


def test_bad_weights_values_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.detector\.backbone\.weights: weights file not found: .*nope"):
        resolve_weights(tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="torchvision has no ImageNet-1k V1 weights for 'resnet9000'"):
        parse_source("torchvision://resnet9000")
    with pytest.raises(ValueError, match="unknown source scheme 's3'"):
        parse_source("s3://bucket/file.pth")
