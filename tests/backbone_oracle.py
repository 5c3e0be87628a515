"""Shared helpers of the backbone / neck / converter tests: oracle location and the tiny model's config.

The oracle directory comes from ``CODETR_ORACLE_DIR`` (default ``<repo>/../shared/oracle``); the ResNet and
ChannelMapper are built from the oracle's own mmdet config (``tiny_config.json["model_cfg"]``), not from constants.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
R50_TSV = REPO.parent / "shared" / "reference" / "CO_DINO_R50_STATE_DICT.tsv"


def oracle_dir() -> Path:
    return Path(os.environ.get("CODETR_ORACLE_DIR", REPO.parent / "shared" / "oracle"))


def oracle_file(name: str) -> Path:
    path = oracle_dir() / name
    if not path.exists():
        pytest.skip(f"oracle file {path} not found; set CODETR_ORACLE_DIR to the oracle directory")
    return path


@cache
def oracle_load(name: str):
    """Oracle ``.pth`` files hold python containers next to tensors (our own trusted test data)."""
    path = oracle_file(name)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, map_location="cpu", weights_only=False)


def tiny_backbone_neck():
    """ResNet + ChannelMapper built from the oracle's mmdet config, with the oracle's weights loaded."""
    from codetr.models.backbones import ResNet
    from codetr.models.necks import ChannelMapper

    cfg = oracle_load("tiny_config.json")["model_cfg"]
    b, n = cfg["backbone"], cfg["neck"]
    backbone = ResNet(depth=b["depth"], base_channels=b.get("base_channels", 64), frozen_stages=b["frozen_stages"],
                      norm_eval=b["norm_eval"], out_indices=b["out_indices"])
    neck = ChannelMapper(n["in_channels"], n["out_channels"], n["num_outs"], n["norm_cfg"]["num_groups"],
                         kernel_size=n.get("kernel_size", 1))
    state = torch.load(oracle_file("tiny_state_dict.pth"), map_location="cpu", weights_only=True)
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    neck.load_state_dict({k[len("neck."):]: v for k, v in state.items() if k.startswith("neck.")})
    return backbone, neck


def r50_reference_shapes() -> dict[str, tuple[int, ...]]:
    """``key -> shape`` of the full mmdet-3 Co-DINO R50 state dict (oracle json, else the reference TSV)."""
    path = oracle_dir() / "r50_state_dict_keys.json"
    if path.exists():
        return {k: tuple(s) for k, s, _ in json.loads(path.read_text())["state_dict"]}
    if not R50_TSV.exists():
        pytest.skip(f"neither {path} nor {R50_TSV} found (oracle / reference data)")
    out = {}
    for line in R50_TSV.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split("\t")
            out[key] = tuple(json.loads(shape))
    return out
