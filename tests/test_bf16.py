"""`trainer.precision=bf16-mixed` end to end: the tiny Co-DINO (all auxiliary heads, denoising) trains 200 optimiser
steps on the CPU with every loss term finite at every step, no step skipped by the non-finite guard, and a falling
loss (deformable-attention sampling, matching and losses run in fp32 under autocast)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from codetr.train import train

STEPS = 200


@pytest.mark.slow
def test_bf16_mixed_trains_two_hundred_steps_without_nonfinite_losses(compose_cfg):
    cfg = compose_cfg("train", [
        "experiment=demo", "data.generate.num_train=16", "data.generate.num_val=4", "data.generate.image_size=64",
        "data.batch_size=2", "aug.scales=[64]", "aug.crop_scales=[64]", "aug.crop_size=[48,64]", "aug.test_scale=64",
        "callbacks=none", "logger=csv", "trainer.precision=bf16-mixed", "trainer.max_epochs=-1",
        f"+trainer.max_steps={STEPS}", "+trainer.limit_val_batches=0", "trainer.log_every_n_steps=1",
    ])
    train(cfg)
    rows = list(csv.DictReader(next(Path(cfg.paths.output_dir).glob("csv/**/metrics.csv")).open()))
    losses = [float(row["train/loss_step"]) for row in rows if row.get("train/loss_step")]
    assert len(losses) == STEPS
    terms = [(row["step"], key, float(value)) for row in rows for key, value in row.items()
             if key.startswith("train/") and "loss" in key and value]
    assert len(terms) > 30 * STEPS  # every term of every step was logged
    assert [t for t in terms if not math.isfinite(t[2])] == []
    assert not any(row.get("train/skipped_steps") for row in rows)
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:5]) / 5
