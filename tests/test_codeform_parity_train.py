"""Training parity of Co-Deformable-DETR with the official Sense-X code (oracle ``CODETR_ORACLE_CODEFORM_DIR``).

Three records, each one ``CoDETR.forward_train`` call of the reference on the same weights and batch:

* ``train_seeded``: stock behaviour from the CPU RNG state the reference had right before the call (the record's
  ``cpu_rng_state_before_loss``, i.e. its own seed); our code draws its random numbers (RPN / RoI samplers,
  positive-query padding) in the reference's order;
* ``train_det``: ``torch.randperm`` replaced by ``arange`` (first candidates in index order);
* ``train_det_empty_gt``: as ``train_det`` with one image's ground truth emptied (the record's ``empty_gt_img``).

The RPN proposals fed to the RoI head are the recorded ones (the reference's NMS sorts tied scores unstably, see
the oracle README); the sampler choices and the positive-query targets must then equal the records. Every loss
term within 1e-4 relative; per-parameter gradient norms within 1e-3 relative, the same parameters receiving
gradients.
"""

from __future__ import annotations

import re
from unittest import mock

import pytest
import torch
from aux_oracle import Recorder
from codeform_oracle import build_detector, image_sizes, load, require_codeform, targets
from parity_support import (
    gradient_norm_errors,
    loss_failures,
    parameters_with_gradients,
    reference_loss_values,
    seed_like_record,
)

import codetr.models.heads.co_deformable_detr_head as head_module
from codetr.convert import rename_key

RTOL = 1e-4
RECORDS = ["train_seeded", "train_det", "train_det_empty_gt"]


def _run(mode: str, backward: bool) -> dict:
    require_codeform()
    record = load("tiny_outputs.pth")[mode]
    detector = build_detector().train()
    rpn, roi = detector.rpn_head, detector.roi_head[0]
    rpn.sampler, roi.sampler = Recorder(rpn.sampler), Recorder(roi.sampler)
    recorded = [p["bboxes"] for p in record["records"]["rpn_proposals"]]
    own = rpn.loss_and_proposals

    def replayed_proposals(*args, **kwargs):
        losses, _ = own(*args, **kwargs)
        return losses, [boxes.clone() for boxes in recorded]

    queries = []
    build = head_module.build_positive_queries

    def recording_build(*args, **kwargs):
        queries.append(build(*args, **kwargs))
        return queries[-1]

    rpn.loss_and_proposals = replayed_proposals
    original = torch.randperm
    try:
        if mode != "train_seeded":
            torch.randperm = lambda n, *args, **kwargs: torch.arange(n)
        with mock.patch.object(head_module, "build_positive_queries", recording_build):
            seed_like_record(record)
            losses = detector(load("tiny_inputs.pth")["img"].float(), image_sizes(), targets(record))
    finally:
        torch.randperm = original
    if backward:
        sum(v for k, v in losses.items() if "loss" in k).backward()
    return {"detector": detector, "losses": losses, "queries": queries, "record": record,
            "rpn_sampling": rpn.sampler.results, "roi_sampling": roi.sampler.results}


@pytest.fixture(scope="module")
def runs():
    return {}


def _get(runs: dict, mode: str) -> dict:
    if mode not in runs:
        runs[mode] = _run(mode, backward=mode in ("train_seeded", "train_det_empty_gt"))
    return runs[mode]


@pytest.mark.parametrize("mode", RECORDS)
def test_every_loss_term_matches(runs, mode):
    run = _get(runs, mode)
    failures, worst = loss_failures(run["losses"], reference_loss_values(run["record"]), RTOL)
    assert not failures, "loss terms differ from the oracle:\n" + "\n".join(failures)
    total = sum(float(v.detach()) for k, v in run["losses"].items() if "loss" in k)
    assert abs(total - run["record"]["total_loss"]) <= RTOL * abs(total)
    print(f"{mode}: largest relative loss error {worst:.3g}")


@pytest.mark.parametrize("mode", RECORDS)
def test_sampler_choices_and_positive_queries_match_the_records(runs, mode):
    run = _get(runs, mode)
    records = run["record"]["records"]
    for name in ("rpn_sampling", "roi_sampling"):
        assert len(run[name]) == len(records[name])
        for got, ref in zip(run[name], records[name]):
            assert torch.equal(got.pos_inds, ref["pos_inds"]), name
            assert torch.equal(got.neg_inds, ref["neg_inds"]), name
            assert torch.equal(got.pos_assigned_gt_inds, ref["pos_assigned_gt_inds"]), name
    assert len(run["queries"]) == len(records["aux_targets"])
    for got, ref in zip(run["queries"], records["aux_targets"]):
        assert torch.equal(got.labels, ref["aux_labels"])
        torch.testing.assert_close(got.boxes, ref["aux_coords"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.targets, ref["aux_targets"], rtol=0, atol=1e-5)
        torch.testing.assert_close(got.label_weights, ref["aux_label_weights"], rtol=0, atol=0)
        torch.testing.assert_close(got.box_weights, ref["aux_bbox_weights"], rtol=0, atol=0)
        torch.testing.assert_close(got.features.detach(), ref["aux_feats"], rtol=0, atol=1e-4)


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
    frozen = [n for n in named if re.match(r"backbone\.(conv1|bn1|layer1)\.", n) or ".bn" in n]
    assert frozen and all(named[n].grad is None for n in frozen)
    print(f"{mode}: largest gradient-norm error {errors[0][0]:.3g} ({errors[0][1]})")
