"""Export of the tiny Co-DINO's inference model (random weights): ONNX through onnxruntime, the ``torch.export``
program and an AOTInductor package each match the eager model on images of two sizes, batch 1 and 2."""

from __future__ import annotations

import json
import os

import pytest
import torch

from codetr.export import main as export_main
from codetr.inference import Detector, describe_recipe
from codetr.inference.detector import build_model
from codetr.inference.export import (
    example_inputs,
    export_program,
    inference_model,
    load_exported,
    write_program,
)

onnxruntime = pytest.importorskip("onnxruntime")
SIZES = [(1, 128, 160), (2, 200, 136)]  # batch, padded height, width (the second image of a batch is smaller)


@pytest.fixture(scope="module")
def eager_and_program():
    torch.manual_seed(0)
    detector = Detector(build_model(describe_recipe("demo", ["aug.test_scale=96"])), describe_recipe("demo"))
    model = inference_model(detector)
    return detector, model, export_program(model)


def assert_same_detections(expected, got, box_tol=1e-3, score_tol=1e-4):
    """Equal detections up to the order of near-tied scores: every expected row clearly above the last kept score
    has a row in ``got`` with its label, its box within ``box_tol`` px and its score within ``score_tol``."""
    (boxes_a, scores_a, labels_a), (boxes_b, scores_b, labels_b) = expected, got
    assert boxes_a.shape == boxes_b.shape and scores_a.shape == scores_b.shape
    torch.testing.assert_close(scores_b, scores_a, atol=score_tol, rtol=0)  # both sorted descending
    for image in range(len(scores_a)):
        clear = scores_a[image] > scores_a[image, -1] + score_tol
        box_gap = (boxes_a[image][clear][:, None] - boxes_b[image][None]).abs().amax(-1)
        score_gap = (scores_a[image][clear][:, None] - scores_b[image][None]).abs()
        same = (labels_a[image][clear][:, None] == labels_b[image][None]) & (score_gap <= score_tol)
        best = torch.where(same, box_gap, torch.full_like(box_gap, float("inf"))).amin(1)
        assert float(best.max()) <= box_tol, f"image {image}: largest box difference {float(best.max()):.2e} px"


def eager(model, inputs):
    with torch.inference_mode():
        return model(*inputs)


def test_onnxruntime_matches_eager_on_two_sizes_batch_1_and_2(eager_and_program, tmp_path):
    detector, model, program = eager_and_program
    path = write_program(program, tmp_path / "tiny.onnx", "onnx", json.dumps(detector.description.to_dict()))
    run = load_exported(path)
    for size in SIZES:
        inputs = example_inputs(*size)
        assert_same_detections(eager(model, inputs), run(*inputs))
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert json.loads(meta["codetr_model"])["test_transform"]["name"] == "detr"
    assert not [n for n in onnx.load(str(path)).graph.initializer if "rpn_head" in n.name or "roi_head" in n.name]


def test_torch_export_program_saves_loads_and_matches_eager(eager_and_program, tmp_path):
    _, model, program = eager_and_program
    run = load_exported(write_program(program, tmp_path / "tiny.pt2", "torch-export"))
    for size in SIZES:
        inputs = example_inputs(*size)
        assert_same_detections(eager(model, inputs), run(*inputs))
    small = example_inputs(1, 100, 90)  # below the graphs' minimum side: padded by the runner, same detections
    padded = (torch.nn.functional.pad(small[0], (0, 38, 0, 28)), small[1])
    assert_same_detections(eager(model, padded), run(*small))


# AOTInductor compiles the whole graph to C++ single-threaded: over 10 minutes on a 2-core CI machine, a third of
# CI's budget, so it runs on request: CODETR_TEST_AOTI=1 pytest tests/test_export.py -k aoti.
@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("CODETR_TEST_AOTI"), reason="set CODETR_TEST_AOTI=1 (compiles for minutes)")
def test_aoti_package_compiles_on_cpu_and_matches_eager(eager_and_program, tmp_path):
    _, model, program = eager_and_program
    run = load_exported(write_program(program, tmp_path / "tiny_aoti.pt2", "aoti"), "aoti")
    for size in SIZES:
        inputs = example_inputs(*size)
        assert_same_detections(eager(model, inputs), run(*inputs))


def test_export_cli_refuses_a_checkpoint_without_description(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt")
    assert export_main([str(tmp_path / "old.ckpt"), str(tmp_path / "x.onnx")]) == 1
    assert "--recipe" in capsys.readouterr().err
