"""End to end on the CPU with the tiny Co-DINO on a few synthetic images: fast_dev_run, a short training with
checkpoints, resuming it, evaluation and prediction from the checkpoint (main head only), and a two-job multirun.
Each run is a handful of tiny steps (images 64 px)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from codetr import Detector
from codetr.evaluate import evaluate
from codetr.predict import predict
from codetr.train import train

TINY = [
    "experiment=demo",
    "data.generate.num_train=8",
    "data.generate.num_val=4",
    "data.generate.image_size=64",
    "data.batch_size=2",
    "data.datamodule.val_batch_size=2",
    "aug.scales=[64]",
    "aug.crop_scales=[64]",
    "aug.crop_size=[48,64]",
    "aug.test_scale=64",
    "callbacks=none",
]


def test_fast_dev_run_on_cpu(compose_cfg):
    cfg = compose_cfg("train", [*TINY, "+trainer.fast_dev_run=true"])
    metrics = train(cfg)
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
    assert "val/AP" in metrics


def _short_run(compose_cfg, extra: list[str]) -> tuple[dict, Path]:
    cfg = compose_cfg("train", [*TINY, "callbacks=default", "~callbacks.progress_bar", "trainer.max_epochs=1",
                                "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=1", *extra])
    metrics = train(cfg)
    return metrics, Path(cfg.paths.output_dir)


def test_train_checkpoint_resume_evaluate_predict(compose_cfg, tmp_path):
    _, run_dir = _short_run(compose_cfg, [])
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file()
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["global_step"] == 2 and state["epoch"] == 0  # the epoch-end checkpoint of epoch 0
    assert all(k.startswith("detector.") for k in state["state_dict"])
    # the checkpoint describes its model: the Python API rebuilds it without Hydra, with the dataset's names
    assert state["codetr_model"]["class_names"] == ["circle", "square", "triangle", "diamond"]
    detector = Detector.from_checkpoint(last)
    image = run_dir / "demo_data" / "val" / min(p.name for p in (run_dir / "demo_data" / "val").iterdir())
    assert set(detector.predict(image).names) <= {"circle", "square", "triangle", "diamond"}

    # resume: the second epoch continues from step 2 with the restored optimiser state
    metrics, _ = _short_run(compose_cfg, [f"ckpt_path={last}", "trainer.max_epochs=2"])
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4 and resumed["epoch"] == 1
    assert "val/AP" in metrics

    cfg = compose_cfg("evaluate", [*TINY, f"ckpt_path={last}", f"data.root={run_dir / 'demo_data'}"])
    eval_metrics = evaluate(cfg)
    assert 0.0 <= eval_metrics["AP"] <= 1.0
    results = json.loads(Path(cfg.results_file).read_text())
    assert results and {"image_id", "category_id", "bbox", "score"} <= set(results[0])
    assert {"AR@1", "AR@10", "AR@100"} <= set(eval_metrics) and "AR" not in eval_metrics
    written = json.loads(Path(cfg.metrics_file).read_text())
    assert written["AP"] == eval_metrics["AP"]
    assert sorted(row["name"] for row in written["per_class"]) == ["circle", "diamond", "square", "triangle"]
    assert len(written["pr_curves"]["AP50"]) == len(written["pr_curves"]["recall"]) == 101
    assert Path(cfg.pr_curves_file).stat().st_size > 1000

    images = run_dir / "demo_data" / "val"
    cfg = compose_cfg("predict", [*TINY, f"ckpt_path={last}", f"input={images}", f"data.root={run_dir / 'demo_data'}",
                                  "score_threshold=0.0"])
    predictions = predict(cfg)
    assert len(predictions) == len(list(images.iterdir()))
    written = json.loads((Path(cfg.output_dir) / "detections.json").read_text())
    assert len(written) == len(predictions) and written[0]["boxes"]
    assert len(list(Path(cfg.output_dir).glob("*.png"))) == len(predictions)


def test_multirun_two_jobs(tmp_path):
    command = [sys.executable, "-m", "codetr.train", "-m", *TINY, "+trainer.fast_dev_run=true", "logger=csv",
               f"paths.log_dir={tmp_path}", "optimizer.lr=1e-4,2e-4"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(tmp_path.glob("demo/multiruns/*/[0-9]"))
    assert [j.name for j in jobs] == ["0", "1"]
    lrs = [OmegaConf.load(job / ".hydra" / "config.yaml").optimizer.lr for job in jobs]
    assert lrs == [1e-4, 2e-4]
    for job in jobs:  # Hydra's log file gets the run's log (Lightning's messages included) and the AP table
        log = (job / "train.log").read_text()
        assert "`Trainer.fit` stopped" in log and "Running in `fast_dev_run` mode" in log, log[-2000:]
        assert "COCO box AP" in log and "AR@100" in log and "APl" in log, log[-2000:]
