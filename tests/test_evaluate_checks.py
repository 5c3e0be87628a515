"""Evaluation refuses a checkpoint trained for another number of classes (its class heads would be re-initialised
at random and still print a normal AP table)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from codetr.checkpoint_io import load_detector_weights
from codetr.evaluate import evaluate
from codetr.train import build_module

TINY = ["experiment=demo", "data.generate.num_train=2", "data.generate.num_val=2", "data.generate.image_size=64",
        "aug.test_scale=64"]


def save_detector(module, path):
    torch.save({"state_dict": {f"detector.{k}": v for k, v in module.detector.state_dict().items()}}, path)


def test_a_checkpoint_for_another_class_count_is_an_evaluation_error(compose_cfg, tmp_path):
    three = tmp_path / "three_classes.ckpt"
    save_detector(build_module(compose_cfg("train", [*TINY, "data.num_classes=3"])), three)

    cfg = compose_cfg("evaluate", [*TINY, "data.num_classes=4", f"ckpt_path={three}"])
    with pytest.raises(ValueError, match=r"three_classes.ckpt was trained for 3 classes, the config / dataset has 4"):
        evaluate(cfg)
    # the same class count loads, class heads included
    same = build_module(compose_cfg("train", [*TINY, "data.num_classes=3"]))
    assert load_detector_weights(same.detector, three, strict_classes=True) == []


@pytest.mark.parametrize("eval_module", ["one-stage", "two-stage"])
def test_evaluate_scores_an_auxiliary_head_with_eval_module(compose_cfg, tmp_path, eval_module):
    """``eval_module=one-stage|two-stage`` evaluates the ATSS / Faster R-CNN branch (the reference's option), and
    its detections differ from the DETR head's."""
    path = tmp_path / "model.ckpt"
    save_detector(build_module(compose_cfg("train", TINY)), path)
    metrics = {}
    for module in ("detr", eval_module):
        cfg = compose_cfg("evaluate", [*TINY, f"ckpt_path={path}", f"eval_module={module}"])
        metrics[module] = evaluate(cfg)
        results = json.loads(Path(cfg.results_file).read_text())
        metrics[module]["scores"] = sorted(round(r["score"], 6) for r in results)
    assert "AP" in metrics[eval_module]
    assert metrics[eval_module]["scores"] != metrics["detr"]["scores"]  # another head's detections were scored
    with pytest.raises(ValueError, match="eval_module must be one of"):
        evaluate(compose_cfg("evaluate", [*TINY, f"ckpt_path={path}", "eval_module=rpn"]))
