"""Two-trial Hydra sweeps on the demo data. Basic sweeper (`-m`): both trials train and return their metric, and their
W&B runs (offline) share one group -- the sweep directory's name -- with distinct run names. Optuna sweeper
(hparams_search=optuna): proposed values inside the search space, best trial reported."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import yaml
from test_train_e2e import TINY


def test_two_trial_sweep_shares_one_wandb_group(tmp_path):
    overrides = [item for item in TINY if item != "callbacks=none"]
    command = [sys.executable, "-m", "codetr.train", "-m", *overrides, "callbacks=none", "logger=[csv,wandb]",
               "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
               f"paths.log_dir={tmp_path}", "optimizer.lr=1e-4,2e-4"]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(tmp_path.glob("demo/multiruns/*/[0-9]"))
    assert [job.name for job in jobs] == ["0", "1"]
    sweep_name = jobs[0].parent.name
    loggers, lrs = [], []
    for job in jobs:
        hparams = yaml.safe_load(next(job.glob("csv/**/hparams.yaml")).read_text())
        loggers.append(hparams["logger"]["wandb"])
        lrs.append(hparams["optimizer"]["lr"])
        metrics = next(job.glob("csv/**/metrics.csv")).read_text()
        assert "val/AP" in metrics.splitlines()[0]  # the metric the sweep optimises was logged
        assert list(job.glob("wandb/offline-run-*")), f"no offline W&B run under {job}"
    assert lrs == [1e-4, 2e-4]
    assert [logger["group"] for logger in loggers] == [sweep_name, sweep_name]
    assert [logger["name"] for logger in loggers] == ["demo-0", "demo-1"]


def test_two_trial_optuna_sweep_returns_the_best_trial(tmp_path):
    """hparams_search=optuna: TPE proposes each trial's values inside the configured space, every trial trains and
    returns val/AP, and the sweeper writes the best trial's parameters and value."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper not installed")
    overrides = [item for item in TINY if item != "callbacks=none"]
    command = [sys.executable, "-m", "codetr.train", "-m", "hparams_search=optuna", *overrides, "callbacks=none",
               "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "+trainer.limit_val_batches=1",
               f"paths.log_dir={tmp_path}", "hydra.sweeper.n_trials=2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(tmp_path.glob("demo/multiruns/*/[0-9]"))
    assert [job.name for job in jobs] == ["0", "1"]
    trials = []
    for job in jobs:
        hparams = yaml.safe_load(next(job.glob("csv/**/hparams.yaml")).read_text())
        lr = hparams["optimizer"]["lr"]
        assert 5e-5 <= lr <= 8e-4 and hparams["optimizer"]["backbone_lr_mult"] in (0.05, 0.1, 0.2)
        rows = list(csv.DictReader(next(job.glob("csv/**/metrics.csv")).open()))
        ap = [float(row["val/AP"]) for row in rows if row.get("val/AP")]
        assert ap, f"no val/AP logged in {job}"
        trials.append((ap[-1], lr))
    assert trials[0][1] != trials[1][1]  # the sampler proposed two different learning rates
    summary = yaml.safe_load((jobs[0].parent / "optimization_results.yaml").read_text())
    assert summary["name"] == "optuna"
    best = max(ap for ap, _ in trials)
    assert summary["best_value"] == pytest.approx(best, abs=1e-6)
    best_lrs = [lr for ap, lr in trials if abs(ap - best) <= 1e-6]  # a tie (1 training batch) may pick either
    assert any(summary["best_params"]["optimizer.lr"] == pytest.approx(lr) for lr in best_lrs)
