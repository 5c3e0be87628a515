"""Training parity of Co-DINO-Inst with the official Sense-X code (oracle ``CODETR_ORACLE_MASK_DIR``).

Three records, each one ``CoDETR.forward_train`` of the reference with GT masks on the same weights and batch
(polygon masks, one image's masks compressed RLE):

* ``train_seeded``: stock behaviour from the CPU RNG state the reference had before the call (its seed); our code
  draws its random numbers in the reference's order (denoising noise, RPN sampling, the mask branch's sampling,
  RoI sampling, positive-query padding);
* ``train_det``: ``torch.randperm`` replaced by ``arange``;
* ``train_det_empty_gt``: as ``train_det`` with one image's ground truth emptied (the record's ``empty_gt_img``).

The RPN proposals fed to the RoI head are the recorded ones (exactly tied scores over padding are ordered by a
non-stable sort in the reference). Then: the query head's training boxes that feed the mask branch, the mask
sampler's choices and every stage's mask targets equal the records; every loss term (each box term, ``loss_mask``
= the weighted sum of the boundary-aware stage losses, ``loss_mask_iou``) within 1e-4 relative; per-parameter
gradient norms within 1e-3 relative, the same parameters receiving gradients.
"""

from __future__ import annotations

import re

import pytest
import torch
from aux_oracle import Recorder
from mask_oracle import build_detector, image_sizes, load, require_mask_oracle, targets, unpack
from parity_support import (
    gradient_norm_errors,
    loss_failures,
    parameters_with_gradients,
    reference_loss_values,
    seed_like_record,
)

from codetr.convert import rename_key

RTOL = 1e-4
RECORDS = ["train_seeded", "train_det", "train_det_empty_gt"]


def _run(mode: str) -> dict:
    require_mask_oracle()
    record = load("tiny_outputs.pth")[mode]
    detector = build_detector().train()
    rpn, branch = detector.rpn_head, detector.mask_branch
    branch.sampler = Recorder(branch.sampler)
    recorded = [p["bboxes"] for p in record["records"]["rpn_proposals"]]
    own = rpn.loss_and_proposals
    rpn.loss_and_proposals = lambda *a, **k: (own(*a, **k)[0], [b.clone() for b in recorded])
    captured: dict = {}
    own_boxes, own_targets = branch.training_boxes, branch.stage_targets

    def training_boxes(*a, **k):
        captured["boxes"] = own_boxes(*a, **k)
        return captured["boxes"]

    def stage_targets(*a, **k):
        captured["targets"] = own_targets(*a, **k)
        return captured["targets"]

    branch.training_boxes, branch.stage_targets = training_boxes, stage_targets
    original = torch.randperm
    try:
        if mode != "train_seeded":
            torch.randperm = lambda n, *args, **kwargs: torch.arange(n)
        seed_like_record(record)
        losses = detector(load("tiny_inputs.pth")["img"].float(), image_sizes(), targets(record))
    finally:
        torch.randperm = original
    sum(v for k, v in losses.items() if "loss" in k).backward()
    return {"detector": detector, "losses": losses, "record": record, "sampling": branch.sampler.results,
            **captured}


@pytest.fixture(scope="module")
def runs():
    return {}


def _get(runs: dict, mode: str) -> dict:
    if mode not in runs:
        runs[mode] = _run(mode)
    return runs[mode]


@pytest.mark.parametrize("mode", RECORDS)
def test_every_loss_term_matches(runs, mode):
    run = _get(runs, mode)
    failures, worst = loss_failures(run["losses"], reference_loss_values(run["record"]), RTOL)
    assert not failures, "loss terms differ from the oracle:\n" + "\n".join(failures)
    assert {"loss_mask", "loss_mask_iou"} <= set(run["losses"])
    print(f"{mode}: largest relative loss error {worst:.3g}")


@pytest.mark.parametrize("mode", RECORDS)
def test_mask_branch_inputs_sampling_and_targets_match_the_records(runs, mode):
    run = _get(runs, mode)
    records = run["record"]["records"]
    for ours, ref in zip(run["boxes"], records["query_head_detections"], strict=True):
        torch.testing.assert_close(ours, ref[:, :4], rtol=0, atol=1e-3)
    assert len(run["sampling"]) == len(records["mask_sampling"])
    for got, ref in zip(run["sampling"], records["mask_sampling"], strict=True):
        assert torch.equal(got.pos_inds, ref["pos_inds"])
        assert torch.equal(got.neg_inds, ref["neg_inds"])
        assert torch.equal(got.pos_assigned_gt_inds, ref["pos_assigned_gt_inds"])
    for ours, ref in zip(run["targets"], records["mask_targets"], strict=True):
        assert torch.equal(ours.bool(), unpack(ref)), "a stage's mask targets differ"
    if mode == "train_det_empty_gt":
        empty = run["record"]["empty_gt_img"]
        assert len(run["sampling"][empty].pos_inds) == 0 and len(run["sampling"][empty].neg_inds) > 0


@pytest.mark.parametrize("mode", ["train_seeded", "train_det_empty_gt"])
def test_gradients_match_and_frozen_parts_get_none(runs, mode):
    run = _get(runs, mode)
    detector, record = run["detector"], run["record"]["grad_norm_sum"]
    named = dict(detector.named_parameters())
    expected = {rename_key(n) for n in record["names"]}
    in_graph = parameters_with_gradients(named)
    assert in_graph == expected, f"differs: {sorted(in_graph ^ expected)[:10]}"
    errors = gradient_norm_errors(named, record, rename_key)
    failures = [f"{name}: {ours:.6g} vs {norm:.6g}" for error, name, ours, norm in errors if not error <= 1e-3]
    assert not failures, "\n".join(failures[:20])
    assert any(n.startswith("mask_branch.mask_head.") for n in in_graph)
    assert any(n.startswith("mask_branch.mask_iou_head.") for n in in_graph)
    assert not [n for n in named if re.match(r"backbone\.", n) and named[n].grad is None]
    print(f"{mode}: largest gradient-norm error {errors[0][0]:.3g} ({errors[0][1]})")
