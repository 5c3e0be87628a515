"""A two-trial Hydra sweep (basic sweeper, `-m`) on the demo data: both trials train and return their metric, and
their W&B runs (offline) share one group -- the sweep directory's name -- with distinct run names."""

from __future__ import annotations

import os
import subprocess
import sys

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
