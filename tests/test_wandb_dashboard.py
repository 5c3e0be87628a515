"""The W&B dashboard of a real (tiny, offline) training run, read back from the run's files: learning rate per
step with the warm-up, AP / AR@100, per-class AP table and bar chart, PR-curve image, validation images with
ground-truth and prediction box layers, best val/AP and its epoch in the summary, checkpoints as artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_train_e2e import TINY
from wandb_support import read_offline_run

from codetr.train import train


@pytest.fixture
def offline_run(compose_cfg, monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_cfg(
        "train",
        [
            *TINY,
            "callbacks=wandb",
            "~callbacks.progress_bar",
            "logger=wandb",
            "logger.wandb.log_model=all",
            "trainer.max_epochs=2",
            "+trainer.limit_train_batches=3",
            "+trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "scheduler.warmup_iters=4",
            "callbacks.wandb_images.score_threshold=0.0",
        ],
    )
    try:
        metrics = train(cfg)
    finally:
        wandb.finish()
    (run_dir,) = (Path(cfg.paths.output_dir) / "wandb").glob("offline-run-*")
    return metrics, read_offline_run(run_dir)


@pytest.mark.slow
def test_offline_run_logs_the_dashboard(offline_run):
    metrics, run = offline_run
    history, summary = run["history"], run["summary"]
    keys = set().union(*history)

    lr_keys = sorted(k for k in keys if k.startswith("lr"))  # LearningRateMonitor: lr/<param group name>
    assert lr_keys, sorted(keys)
    lrs = [row[lr_keys[0]] for row in history if lr_keys[0] in row]
    assert (
        len(lrs) >= 6 and lrs[0] < lrs[1] < lrs[2] < lrs[3] and lrs[4] == lrs[5]
    )  # linear warm-up over 4 steps

    val_rows = [row for row in history if "val/AP" in row]
    assert len(val_rows) == 2 and all("val/AR@100" in row and "val/AR@1" in row for row in val_rows)
    assert not any(k == "val/AR" for k in keys)
    for name in ("val/per_class_AP", "val/per_class_AP_bar_table", "val/pr_curves"):
        assert f"{name}/_type" in keys, (name, sorted(keys))
    assert any(row.get("val/per_class_AP/nrows") == 4 for row in history)  # the 4 demo classes

    images = [row for row in history if "val/predictions/_type" in row]
    assert len(images) == 2
    boxes = images[0]["val/predictions/all_boxes"]
    assert {"ground_truth", "predictions"} <= set().union(*(image for image in boxes))

    best = max(row["val/AP"] for row in val_rows)
    assert summary["best/val_AP"] == pytest.approx(best)
    assert summary["best/epoch"] == next(i for i, row in enumerate(val_rows) if row["val/AP"] == best)
    assert metrics["val/AP"] == pytest.approx(val_rows[-1]["val/AP"])

    models = [a for a in run["artifacts"] if a[1] == "model"]
    assert models, run["artifacts"]
