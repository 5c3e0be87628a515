"""Masks through the application, on a tiny ``experiment=demo_inst`` run (CPU, offline W&B): training logs box and
mask AP side by side (``val/AP`` unchanged, ``val/segm_AP`` ...) and keeps the best checkpoints by the configured
monitor (mask AP for this recipe); the W&B run has mask layers on its validation images and the mask per-class
table; ``evaluate`` writes the segmentation results (RLE), the mask per-class AP and PR curves next to the box ones."""

from __future__ import annotations

import json
from pathlib import Path

import pycocotools.mask as mask_utils
import pytest
import torch
from test_train_e2e import TINY
from wandb_support import read_offline_run

from codetr.evaluate import evaluate
from codetr.train import train

TINY_INST = [*(o for o in TINY if not o.startswith("experiment=")), "experiment=demo_inst",
             "model.mask_stage_sizes=[8,16,32,64]", "model.mask_channels=16", "model.mask_fc_channels=32"]


@pytest.fixture(scope="module")
def inst_run(tmp_path_factory):
    """Trains once for the module: 2 epochs x 2 steps, W&B offline."""
    wandb = pytest.importorskip("wandb")
    from conftest import compose_for

    root = tmp_path_factory.mktemp("inst")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_SILENT", "true")
        cfg = compose_for(root, "train", [*TINY_INST, "callbacks=wandb", "~callbacks.progress_bar", "logger=wandb",
                                          "trainer.max_epochs=2", "+trainer.limit_train_batches=2",
                                          "+trainer.limit_val_batches=1", "callbacks.wandb_images.score_threshold=0.0",
                                          "callbacks.wandb_images.num_images=2"])
        try:
            metrics = train(cfg)
        finally:
            wandb.finish()
    run_dir = Path(cfg.paths.output_dir)
    (wandb_dir,) = (run_dir / "wandb").glob("offline-run-*")
    return cfg, metrics, run_dir, read_offline_run(wandb_dir)


def test_training_logs_box_and_mask_ap_and_keeps_checkpoints_by_mask_ap(inst_run):
    cfg, metrics, run_dir, _ = inst_run
    assert cfg.monitor == "val/segm_AP" and cfg.callbacks.model_checkpoint.monitor == "val/segm_AP"
    for key in ("val/AP", "val/AP50", "val/AR@100", "val/segm_AP", "val/segm_AP75", "val/segm_AR@100"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0, key
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    (key,) = [k for k in state["callbacks"] if k.startswith("ModelCheckpoint{'monitor': 'val/segm_AP'")]
    checkpoint_state = state["callbacks"][key]
    assert checkpoint_state["best_model_score"] is not None


def test_wandb_run_has_mask_layers_and_the_mask_dashboard(inst_run):
    _, _, _, run = inst_run
    history, summary = run["history"], run["summary"]
    keys = set().union(*history)
    images = [row for row in history if "val/predictions/_type" in row]
    assert len(images) == 2
    masks = images[0].get("val/predictions/all_masks")
    assert masks, sorted(k for k in keys if k.startswith("val/predictions"))
    assert {"predictions"} <= set().union(*(image for image in masks))  # validation targets carry no masks
    assert {"ground_truth", "predictions"} <= set().union(*images[0]["val/predictions/all_boxes"])
    for name in ("val/per_class_segm_AP", "val/per_class_segm_AP_bar_table", "val/segm_pr_curves",
                 "val/per_class_AP", "val/pr_curves"):
        assert f"{name}/_type" in keys, (name, sorted(keys))
    assert "best/val_segm_AP" in summary


def test_evaluate_writes_mask_results_and_per_class_mask_ap(inst_run, compose_cfg):
    _, _, run_dir, _ = inst_run
    cfg = compose_cfg("evaluate", [*TINY_INST, f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                                   f"data.root={run_dir / 'demo_data'}"])
    metrics = evaluate(cfg)
    assert {"AP", "segm_AP", "segm_AP50", "segm_AR@100"} <= set(metrics)
    written = json.loads(Path(cfg.metrics_file).read_text())
    assert written["segm_AP"] == metrics["segm_AP"] and written["AP"] == metrics["AP"]
    assert sorted(r["name"] for r in written["segm_per_class"]) == ["circle", "diamond", "square", "triangle"]
    assert len(written["segm_pr_curves"]["AP"]) == 101
    results = Path(cfg.results_file)
    segm = json.loads(results.with_name(f"{results.stem}_segm{results.suffix}").read_text())
    assert segm and {"image_id", "category_id", "segmentation", "score"} <= set(segm[0])
    area = mask_utils.area({"size": segm[0]["segmentation"]["size"],
                            "counts": segm[0]["segmentation"]["counts"].encode()})
    assert area >= 0
    curves = Path(cfg.pr_curves_file)
    assert curves.with_name(f"{curves.stem}_segm{curves.suffix}").stat().st_size > 1000
