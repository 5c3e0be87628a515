"""MemoryMonitor logs memory curves through a real Lightning run (CPU: host peak RSS; CUDA adds GPU peaks)."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from test_nonfinite import OPTIMIZER, SCHEDULER, ScriptedDetector, batches

from codetr.lightning import CoDETRModule
from codetr.lightning.monitoring import MemoryMonitor, host_peak_rss_bytes


def test_memory_curves_are_logged_every_n_steps(tmp_path):
    logger = CSVLogger(tmp_path, name="csv")
    trainer = pl.Trainer(accelerator="cpu", max_steps=4, logger=logger, log_every_n_steps=1,
                         enable_progress_bar=False, enable_checkpointing=False, callbacks=[MemoryMonitor(2)])
    module = CoDETRModule(ScriptedDetector({}), OPTIMIZER, SCHEDULER)
    calls, log_dict = [], module.log_dict
    module.log_dict = lambda values, **kw: calls.append((trainer.global_step, sorted(values))) or log_dict(values, **kw)
    trainer.fit(module, torch.utils.data.DataLoader(batches(4), batch_size=None))
    monitor_calls = [step for step, keys in calls if keys == ["system/host_peak_rss_gib"]]
    assert monitor_calls == [2, 4]  # every 2 optimiser steps (CPU: no GPU keys)
    rows = list(csv.DictReader(next(tmp_path.glob("csv/**/metrics.csv")).read_text().splitlines()))
    points = [(int(r["step"]), float(r["system/host_peak_rss_gib"])) for r in rows if r.get("system/host_peak_rss_gib")]
    assert points
    assert all(0.01 < value < 1000 for _, value in points)
    assert abs(points[-1][1] - host_peak_rss_bytes() / 1024**3) < 1.0


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="every_n_steps"):
        MemoryMonitor(0)
