"""Evaluation refuses a checkpoint trained for another number of classes (its class heads would be re-initialised
at random and still print a normal AP table)."""

from __future__ import annotations

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
