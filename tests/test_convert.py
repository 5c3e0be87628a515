"""Checkpoint converter: rename rules on the oracle's tiny checkpoint and on the full R50 key table, class-count
changes, refusal of pickled code, unmapped keys, the CLI and ``load_detector_weights``."""

from __future__ import annotations

import re

import pytest
import torch
from backbone_oracle import R50_TSV, oracle_file, oracle_load, r50_reference_shapes
from torch import nn

from codetr.checkpoint_io import (
    CLASS_DEPENDENT,
    CheckpointMismatchError,
    UnsafeCheckpointError,
    load_detector_weights,
)
from codetr.convert import (
    ConversionError,
    convert_file,
    convert_state_dict,
    main,
    read_expected_table,
    rename_key,
)


def _tiny_state():
    return torch.load(oracle_file("tiny_state_dict.pth"), map_location="cpu", weights_only=True)


def _expected_rename(key: str) -> str:
    """The renaming rules of the task, written independently of the converter's regex table."""
    key = key.replace("query_head.label_embedding.", "query_head.dn_generator.label_embedding.")
    m = re.match(r"(query_head\.transformer\.(encoder|decoder)\.layers\.\d+\.)(.*)", key)
    if not m:
        return key
    head, part, rest = m.group(1), m.group(2), m.group(3)
    if part == "decoder" and rest.startswith("attentions.0.attn."):
        rest = "self_attn." + rest[len("attentions.0.attn."):]
    elif rest.startswith("attentions.0."):
        rest = "self_attn." + rest[len("attentions.0."):]
    elif rest.startswith("attentions.1."):
        rest = "cross_attn." + rest[len("attentions.1."):]
    elif rest.startswith("ffns.0.layers.0.0."):
        rest = "ffn.fc1." + rest[len("ffns.0.layers.0.0."):]
    elif rest.startswith("ffns.0.layers.1."):
        rest = "ffn.fc2." + rest[len("ffns.0.layers.1."):]
    elif rest.startswith("norms."):
        idx, tail = rest[len("norms."):].split(".", 1)
        rest = f"norm{int(idx) + 1}.{tail}"
    return head + rest


def test_tiny_checkpoint_converts_with_rules_and_matches_our_modules():
    from codetr.models.backbones import ResNet
    from codetr.models.heads.co_dino_head import CoDINOHead
    from codetr.models.necks import ChannelMapper
    from codetr.models.transformer.dino_transformer import DinoTransformer

    state = _tiny_state()
    conv = convert_state_dict(state)
    assert len(conv.state_dict) == len(state)
    for key, value in state.items():
        new = _expected_rename(key)
        scale = re.fullmatch(r"bbox_head\.\d+\.scales\.\d+\.scale", new)  # 0-d in mmdet, (1,) here (FSDP2)
        assert torch.equal(conv.state_dict[new], value.reshape(1) if scale else value), key
    assert not any(tok in k for k in conv.state_dict for tok in (".attentions.", ".ffns.", ".norms."))
    assert conv.source_num_classes == 80
    # backbone / neck / query head keys and shapes equal those of our modules (tiny sizes from the oracle config)
    cfg = oracle_load("tiny_config.json")
    c = cfg["model_cfg"]
    modules = {
        "backbone.": ResNet(depth=c["backbone"]["depth"], base_channels=c["backbone"]["base_channels"]),
        "neck.": ChannelMapper(c["neck"]["in_channels"], c["neck"]["out_channels"], c["neck"]["num_outs"]),
        "query_head.": CoDINOHead(
            num_classes=cfg["num_classes"],
            transformer=DinoTransformer(
                embed_dims=cfg["embed_dims"], num_heads=cfg["num_heads"], num_levels=cfg["num_levels"],
                num_points=cfg["num_points"], num_encoder_layers=cfg["enc_layers"],
                num_decoder_layers=cfg["dec_layers"], ffn_dims=cfg["ffn_dims"], num_queries=cfg["num_query"],
            ),
            num_dn_queries=cfg["num_dn_queries"],
        ),
    }
    for prefix, module in modules.items():
        ours = {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in conv.state_dict.items() if k.startswith(prefix)}
        assert got == ours, prefix
        module.load_state_dict({k[len(prefix):]: v for k, v in conv.state_dict.items() if k.startswith(prefix)})


@pytest.mark.parametrize("original_naming", [False, True])
def test_full_r50_table_every_key_maps(original_naming):
    ref = r50_reference_shapes()
    assert len(ref) == 674
    state = {k: torch.zeros(s) for k, s in ref.items()}
    if original_naming:  # Sense-X checkpoints keep the DN label embedding on the head itself
        state["query_head.label_embedding.weight"] = state.pop("query_head.dn_generator.label_embedding.weight")
    expected = {_expected_rename(k): s for k, s in ref.items()}
    conv = convert_state_dict(state, expected=expected)  # reference shapes: the 0-d ATSS scales are accepted
    expected = {k: (1,) if ".scales." in k else s for k, s in expected.items()}  # codetr layout
    assert len(conv.state_dict) == 674
    assert sum(1 for k in state if rename_key(k) != k) == len(conv.renamed)
    if R50_TSV.exists():
        table = read_expected_table(R50_TSV)
        assert table == expected
        convert_state_dict(state, expected=table)


def test_unmapped_and_mismatched_keys_fail_naming_them():
    state = dict(_tiny_state())
    bad = dict(state)
    bad["query_head.transformer.encoder.layers.0.attentions.2.foo.weight"] = torch.zeros(1)
    bad["mystery_head.weight"] = torch.zeros(1)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(bad)
    assert "attentions.2.foo.weight" in str(info.value) and "mystery_head.weight" in str(info.value)
    expected = {k: tuple(v.shape) for k, v in convert_state_dict(state).state_dict.items()}
    expected["neck.convs.0.conv.weight"] = (1, 2, 3, 4)
    del expected["query_head.transformer.level_embeds"]
    expected["query_head.transformer.new_thing"] = (3,)
    with pytest.raises(ConversionError) as info:
        convert_state_dict(state, expected=expected)
    text = str(info.value)
    assert "neck.convs.0.conv.weight" in text and "level_embeds" in text and "new_thing" in text


def test_num_classes_change_drops_class_dependent_tensors():
    state = _tiny_state()
    conv = convert_state_dict(state, num_classes=365)
    dropped = set(conv.dropped_class_dependent)
    layers = len([k for k in state if re.fullmatch(r"query_head\.cls_branches\.\d+\.weight", k)])
    assert layers == oracle_load("tiny_config.json")["dec_layers"] + 1
    assert {f"query_head.cls_branches.{i}.{p}" for i in range(layers) for p in ("weight", "bias")} <= dropped
    assert {"query_head.dn_generator.label_embedding.weight", "bbox_head.0.atss_cls.weight",
            "roi_head.0.bbox_head.fc_cls.weight", "roi_head.0.bbox_head.fc_reg.bias"} <= dropped
    assert len(dropped) == 2 * layers + 1 + 2 + 4
    assert not dropped & set(conv.state_dict)
    assert "bbox_head.0.atss_reg.weight" in conv.state_dict
    assert convert_state_dict(state, num_classes=80).dropped_class_dependent == []


def test_cli_writes_codetr_checkpoint(tmp_path, capsys):
    state = _tiny_state()
    src = tmp_path / "official.pth"
    wrapped = {f"module.{k}": v for k, v in state.items()}
    wrapped["ema_query_head_transformer_level_embeds"] = torch.zeros(5, 64)
    torch.save({"state_dict": wrapped, "meta": {"epoch": 12, "mmdet_version": "3.3.0"}}, src)
    dst = tmp_path / "out" / "codetr.ckpt"
    assert main([str(src), str(dst), "--num-classes", "20"]) == 0
    out = capsys.readouterr().out
    assert "query_head.cls_branches.0.weight" in out and "80 -> 20" in out
    ckpt = torch.load(dst, weights_only=True)
    assert all(k.startswith("detector.") for k in ckpt["state_dict"])
    assert ckpt["codetr_meta"]["ignored"] == ["ema_query_head_transformer_level_embeds"]
    assert ckpt["codetr_meta"]["num_classes"] == 20 and ckpt["codetr_meta"]["source_num_classes"] == 80
    key = "detector.query_head.transformer.decoder.layers.1.self_attn.in_proj_weight"
    torch.testing.assert_close(ckpt["state_dict"][key],
                               state["query_head.transformer.decoder.layers.1.attentions.0.attn.in_proj_weight"])


class _Payload:
    def __reduce__(self):
        return (eval, ("1 + 1",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    src = tmp_path / "trojan.pth"
    torch.save({"state_dict": {"neck.x": torch.zeros(1)}, "meta": _Payload()}, src)
    with pytest.raises(UnsafeCheckpointError, match="trojan.pth"):
        convert_file(src)
    assert main([str(src), str(tmp_path / "x.ckpt")]) == 1
    assert "trojan.pth" in capsys.readouterr().err
    assert not (tmp_path / "x.ckpt").exists()


def test_swin_backbone_keys_are_converted_inside_a_detector_checkpoint():
    from timm.models.swin_transformer import get_relative_position_index

    from codetr.models.backbones import SwinTransformer
    from codetr.models.backbones.swin import swin_to_mmdet

    torch.manual_seed(0)
    swin = SwinTransformer(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=4,
                           pretrain_img_size=32)
    state = {f"backbone.{k}": v for k, v in swin_to_mmdet(swin.state_dict()).items()}
    state["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"] = get_relative_position_index(4, 4)
    state["neck.convs.0.conv.weight"] = torch.zeros(4, 8, 1, 1)
    conv = convert_state_dict(state)
    assert conv.backbone_naming == "mmdet"
    assert conv.ignored == ["backbone.stages.0.blocks.0.attn.w_msa.relative_position_index"]
    swin.load_state_dict({k[9:]: v for k, v in conv.state_dict.items() if k.startswith("backbone.")})


class _Toy(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.query_head = nn.Module()
        self.query_head.cls_branches = nn.ModuleList([nn.Linear(4, k)])
        self.neck = nn.Linear(4, 4)


def test_load_detector_weights_reinitialises_only_class_dependent_tensors():
    assert any(re.fullmatch(p, "query_head.cls_branches.0.weight") for p in CLASS_DEPENDENT)
    src, dst = _Toy(365), _Toy(80)
    fresh = dst.query_head.cls_branches[0].weight.detach().clone()
    state = {f"detector.{k}": v for k, v in src.state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="trained for 365 classes, the config / dataset has 80"):
        load_detector_weights(dst, state, strict_classes=True)
    reinit = load_detector_weights(dst, state, strict_classes=False)
    assert reinit == ["query_head.cls_branches.0.bias", "query_head.cls_branches.0.weight"]
    assert torch.equal(dst.neck.weight, src.neck.weight) and torch.equal(dst.query_head.cls_branches[0].weight, fresh)
    state["detector.neck.weight"] = torch.zeros(3, 3)
    with pytest.raises(CheckpointMismatchError, match="neck.weight"):
        load_detector_weights(dst, state, strict_classes=False)
    assert issubclass(ConversionError, CheckpointMismatchError)


def test_vit_rope_buffers_are_ignored_and_other_keys_kept():
    state = {
        "backbone.rope_win.freqs_cos": torch.zeros(4, 8),
        "backbone.blocks.0.attn.rope.freqs_sin": torch.zeros(4, 8),
        "backbone.blocks.0.attn.q_bias": torch.zeros(8),
        "backbone.pos_embed": torch.zeros(1, 5, 8),
        "neck.p4.0.weight": torch.zeros(8, 8, 1, 1),
    }
    conv = convert_state_dict(state)
    assert sorted(conv.ignored) == ["backbone.blocks.0.attn.rope.freqs_sin", "backbone.rope_win.freqs_cos"]
    assert sorted(conv.state_dict) == ["backbone.blocks.0.attn.q_bias", "backbone.pos_embed", "neck.p4.0.weight"]
    assert conv.backbone_naming == "identity"
