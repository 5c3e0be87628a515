"""Resume under DDP: two CPU processes (gloo, Lightning's ddp_spawn) train one epoch of the tiny Co-DINO, and a
second run resumes from the last checkpoint to finish a second epoch, continuing the step count and the schedule."""

from __future__ import annotations

from pathlib import Path

import torch
from test_train_e2e import TINY

from codetr.train import train

DDP = ["trainer.accelerator=cpu", "trainer.devices=2", "+trainer.strategy=ddp_spawn", "callbacks=default",
       "~callbacks.progress_bar", "+trainer.limit_val_batches=1", "scheduler.milestones=[1]"]


def test_two_process_ddp_run_resumes_from_its_last_checkpoint(compose_cfg, tmp_path):
    overrides = [item for item in TINY if item != "callbacks=none"]
    first = compose_cfg("train", [*overrides, *DDP, "trainer.max_epochs=1", f"hydra.run.dir={tmp_path}"])
    train(first)
    last = Path(first.paths.output_dir) / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)
    steps_per_epoch = state["global_step"]  # 8 images over 2 ranks x batch 2
    assert steps_per_epoch == 2
    assert state["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 0, "batches": 2}]

    resumed = compose_cfg("train", [*overrides, *DDP, "trainer.max_epochs=2", f"ckpt_path={last}"])
    train(resumed)
    final = torch.load(Path(resumed.paths.output_dir) / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)
    # the final last.ckpt is the epoch-end one of the second epoch (index 1; codetr.lightning.step_checkpoint)
    assert final["global_step"] == 2 * steps_per_epoch and final["epoch"] == 1
    # the schedule continued: the epoch-1 milestone (applied before the first checkpoint) is neither lost nor repeated
    assert state["lr_schedulers"][0]["last_epoch"] == 1 and final["lr_schedulers"][0]["last_epoch"] == 2
    base_lr = state["lr_schedulers"][0]["base_lrs"][0]
    for checkpoint in (state, final):
        assert abs(checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] - 0.1 * base_lr) < 1e-12
