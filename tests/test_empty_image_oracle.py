"""An image without ground truth in a training batch: RPN and ATSS losses against the official code.

The record is the Co-Deformable-DETR oracle's ``train_det_empty_gt`` (``CODETR_ORACLE_CODEFORM_DIR``, default
``<repo>/../shared/oracle-codeform``): a deterministic training call (``torch.randperm`` -> ``arange``) of the
original Co-DETR code in which image 1 of 2 has no boxes. Its RPN and ATSS heads are the same classes as Co-DINO's
(only the strides differ, read from its config), so feeding the recorded encoder maps (``enc_outs``) to our heads
built from that config must reproduce ``loss_rpn_*`` and ``loss_*1``. What an empty image contributes is decided by
the normalisers: the reference counts ``max(#pos, 1)`` (+ ``max(#neg, 1)`` for the sampled RPN) per image.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import pytest
import torch
from aux_oracle import build_atss, build_rpn

REPO = Path(__file__).resolve().parents[1]
RTOL = 1e-5


def codeform_dir() -> Path:
    return Path(os.environ.get("CODETR_ORACLE_CODEFORM_DIR", REPO.parent / "shared" / "oracle-codeform"))


@cache
def _load(name: str):
    path = codeform_dir() / name
    if not path.exists():
        pytest.skip(f"oracle data not found: {path}; set CODETR_ORACLE_CODEFORM_DIR")
    if path.suffix == ".json":
        return json.loads(path.read_text())
    return torch.load(path, weights_only=True, map_location="cpu")


def _heads():
    cfg = _load("tiny_config.json")["model_cfg"]
    state = _load("tiny_state_dict.pth")
    rpn, atss = build_rpn(cfg), build_atss(cfg)
    for module, prefix in ((rpn, "rpn_head."), (atss, "bbox_head.0.")):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        module.load_state_dict(part, strict=True)
    return rpn.train(), atss.train()


def _run(record_name: str):
    record = _load("tiny_outputs.pth")[record_name]
    inputs = _load("tiny_inputs.pth")
    sizes = torch.tensor([list(m["img_shape"][:2]) for m in inputs["img_metas"]])
    boxes = record.get("gt_bboxes_used", inputs["gt_bboxes"])
    labels = record.get("gt_labels_used", inputs["gt_labels"])
    targets = [{"boxes": b.float(), "labels": lab.long()} for b, lab in zip(boxes, labels)]
    pyramid = [f.clone() for f in record["records"]["query_head_forward"]["enc_outs"]]
    rpn, atss = _heads()
    original = torch.randperm
    torch.randperm = lambda n, *args, **kwargs: torch.arange(n)
    try:
        agnostic = [{"boxes": t["boxes"], "labels": torch.zeros_like(t["labels"])} for t in targets]
        rpn_losses, _ = rpn.loss_and_proposals(pyramid, sizes, agnostic)
        atss_losses, _ = atss.loss(pyramid, sizes, targets)
    finally:
        torch.randperm = original
    ours = {**rpn_losses, **{f"{k}1": v for k, v in atss_losses.items()}}
    expected = {k: float(sum(v) if isinstance(v, list) else v) for k, v in record["losses"].items()}
    return ours, expected, targets, record


@pytest.mark.parametrize("record_name", ["train_det_empty_gt", "train_det"])
def test_rpn_and_atss_losses_match_the_official_code(record_name):
    ours, expected, targets, record = _run(record_name)
    if record_name == "train_det_empty_gt":
        empty = record["empty_gt_img"]
        counts = [len(t["boxes"]) for t in targets]
        assert counts[empty] == 0 and all(n > 0 for i, n in enumerate(counts) if i != empty), (
            f"the record empties image {empty} only, the targets have {counts} boxes")
    keys = ["loss_rpn_cls", "loss_rpn_bbox", "loss_cls1", "loss_bbox1", "loss_centerness1"]
    failures = []
    for key in keys:
        value = float(ours[key].detach())
        error = abs(value - expected[key]) / abs(expected[key])
        if error > RTOL:
            failures.append(f"{key}: {value:.7g} vs {expected[key]:.7g} (rel {error:.2g})")
    assert not failures, "\n".join(failures)
