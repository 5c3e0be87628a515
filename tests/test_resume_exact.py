"""A run killed with SIGKILL mid-epoch and restarted with ``ckpt_path=last`` ends bitwise identical to an
uninterrupted run: weights, EMA weights, optimizer moments, LR schedule and validation AP (tiny Co-DINO, CPU,
``trainer.deterministic=true``, all auxiliary heads, denoising and Copy-Paste-free DETR augmentation).

Plus the pieces on their own: the loader resumes at the batch where it stopped (and would not without its state),
per-sample augmentation does not depend on the RNG of the caller, RNG states survive ``weights_only`` loading."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from codetr.data.sampler import ResumableDataLoader, ResumableSampler, SeededSamples
from codetr.lightning.rng import capture_rng_states, restore_rng_states

RUN = [
    "experiment=demo", "data.generate.num_train=16", "data.generate.num_val=4", "data.generate.image_size=64",
    "data.batch_size=2", "data.datamodule.val_batch_size=2", "aug.scales=[48,64]", "aug.crop_scales=[64]",
    "aug.crop_size=[48,64]", "aug.test_scale=64", "callbacks=ema", "callbacks.ema.warmup=4",
    "~callbacks.progress_bar", "callbacks.step_checkpoint.every_n_train_steps=3", "trainer.max_epochs=2",
    "trainer.deterministic=true", "scheduler.milestones=[1]", "logger=csv",
]
STEPS_PER_EPOCH = 8


def launch(run_dir: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "codetr.train", *RUN, f"hydra.run.dir={run_dir}", *extra]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 300) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output[-3000:]


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_identical(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where} differs (max abs {float((a.float() - b.float()).abs().max()):.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    finish(launch(tmp_path / "straight"))

    killed_dir = tmp_path / "killed"
    process = launch(killed_dir)
    last = killed_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before its first step checkpoint: nothing was killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < killed_at < STEPS_PER_EPOCH, f"killed at step {killed_at}: not mid-epoch"

    finish(launch(killed_dir, "ckpt_path=last"))

    straight, resumed = final_state(tmp_path / "straight"), final_state(killed_dir)
    assert (straight["global_step"], resumed["global_step"]) == (2 * STEPS_PER_EPOCH,) * 2
    assert_identical(straight["state_dict"], resumed["state_dict"], "state_dict")
    assert_identical(straight["ema_state_dict"], resumed["ema_state_dict"], "ema_state_dict")
    assert_identical(straight["optimizer_states"], resumed["optimizer_states"], "optimizer_states")
    assert_identical(straight["lr_schedulers"], resumed["lr_schedulers"], "lr_schedulers")
    scores = [next(v["best_model_score"] for k, v in s["callbacks"].items() if "val/AP" in k)
              for s in (straight, resumed)]
    assert_identical(scores[0], scores[1], "best val/AP")
    # the interrupted epoch's train/loss_epoch averages all its steps, those before the kill included
    assert epoch_losses(tmp_path / "straight") == epoch_losses(killed_dir)


def epoch_losses(run_dir: Path) -> dict[int, float]:
    import csv

    rows = csv.DictReader(next(run_dir.glob("csv/**/metrics.csv")).open())
    return {int(r["epoch"]): float(r["train/loss_epoch"]) for r in rows if r.get("train/loss_epoch")}


class Indexed(torch.utils.data.Dataset):
    """Returns its index and one augmentation-like random draw."""

    def __len__(self) -> int:
        return 10

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor([float(index), float(torch.rand(())), random.random(), float(np.random.rand())])


def loader(workers: int = 0) -> ResumableDataLoader:
    dataset = SeededSamples(Indexed())
    return ResumableDataLoader(dataset, batch_size=2, sampler=ResumableSampler(dataset, seed=3),
                               num_workers=workers, generator=torch.Generator().manual_seed(3))


def test_loader_resumes_at_the_consumed_batch_and_not_without_its_state():
    straight = loader()
    straight.sampler.set_epoch(1)
    batches = list(straight)
    interrupted = loader()
    interrupted.sampler.set_epoch(1)
    iterator = iter(interrupted)
    for _ in range(2):  # the trainer used batches 0 and 1 (Lightning does not read ahead of sized loaders)
        next(iterator)
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 2}

    resumed = loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(1)  # Lightning sets the epoch after loading the state
    assert_identical(list(resumed), batches[2:], "resumed batches")
    fresh = loader()
    fresh.sampler.set_epoch(1)
    assert not torch.equal(torch.cat(list(fresh)[:3]), torch.cat(batches[2:5]))  # negative control
    resumed.sampler.set_epoch(2)  # the restart position belongs to epoch 1 only
    assert len(list(resumed)) == 5


def test_augmentation_draws_depend_on_the_sample_only():
    torch.manual_seed(0)
    first = torch.cat(list(loader()))
    torch.manual_seed(123)
    random.seed(5)
    before = torch.get_rng_state()
    second = torch.cat(list(loader(workers=2)))
    assert_identical(first, second, "samples")
    assert torch.equal(before, torch.get_rng_state()), "loading samples consumed the caller's torch RNG"


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    torch.save({"rng": capture_rng_states()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    restore_rng_states(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert_identical((torch.rand(3), random.random(), np.random.rand()), expected)


# ---------------------------------------------------------------- many kills, in one process
# A kill is simulated by an exception from a callback hook: what a SIGKILL at that moment leaves on disk (the last
# completed checkpoint; writes are atomic) is the same, and resuming in-process keeps the test cheap. SIGTERM and
# Ctrl-C are real stop requests (Lightning's flag / a real SIGINT) handled by CheckpointOnSignal.
CHAIN = [
    "experiment=demo", "data.generate.num_train=6", "data.generate.num_val=2", "data.generate.image_size=64",
    "data.batch_size=2", "data.datamodule.val_batch_size=1", "aug.scales=[48,64]", "aug.crop_scales=[64]",
    "aug.crop_size=[48,64]", "aug.test_scale=64", "callbacks=ema", "callbacks.ema.warmup=4",
    "~callbacks.progress_bar", "callbacks.step_checkpoint.every_n_train_steps=1", "trainer.max_epochs=2",
    "trainer.deterministic=true", "scheduler.milestones=[1]", "logger=csv",
]
CHAIN_STEPS = 6  # 2 epochs x 3 batches
# (how, hook, global_step, epoch), one after the other, each in the run resumed after the previous one: a kill
# mid-epoch before that step's checkpoint, during validation, after validation before the epoch-end checkpoint,
# SIGTERM during validation, a kill right after the epoch-end checkpoint, Ctrl-C mid-epoch and a kill during the
# last epoch's validation.
KILLS = [("kill", "train_batch_end", 2, 0), ("kill", "val_batch_end", 3, 0), ("kill", "train_epoch_end", 3, 0),
         ("sigterm", "val_batch_end", 3, 0), ("kill", "train_epoch_start", 3, 1), ("sigint", "train_batch_end", 4, 1),
         ("kill", "val_batch_end", 6, 1)]


class Killed(Exception):
    """Stands for SIGKILL."""


class Interrupter(pl.Callback):
    """Stops the run at ``point`` and records every finished validation ``(epoch, global_step, val/AP)``."""

    def __init__(self, point: tuple | None, validations: list):
        self.point, self.validations, self.fired = point, validations, False

    def _at(self, hook: str, trainer: pl.Trainer) -> None:
        if self.point is None or self.point[1:] != (hook, trainer.global_step, trainer.current_epoch):
            return
        self.fired = True
        how = self.point[0]
        if how == "kill":
            raise Killed(str(self.point))
        if how == "sigterm":
            trainer._signal_connector.received_sigterm = True  # what Lightning's SIGTERM handler does
        else:
            os.kill(os.getpid(), signal.SIGINT)

    def on_train_batch_end(self, trainer, *args):
        self._at("train_batch_end", trainer)

    def on_validation_batch_end(self, trainer, *args):
        self._at("val_batch_end", trainer)

    def on_validation_end(self, trainer, pl_module):
        self.validations.append((trainer.current_epoch, trainer.global_step, float(trainer.callback_metrics["val/AP"])))

    def on_train_epoch_end(self, trainer, pl_module):
        self._at("train_epoch_end", trainer)

    def on_train_epoch_start(self, trainer, pl_module):
        self._at("train_epoch_start", trainer)


def run_chain_part(compose_cfg, run_dir: Path, data_dir: Path, point, validations, resume: bool) -> bool:
    """One process lifetime of the run; True when it was stopped at ``point``."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    import codetr.train as train_module

    cfg = compose_cfg("train", [*CHAIN, f"data.root={data_dir}", *(["ckpt_path=last"] if resume else [])])
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.runtime.output_dir = str(run_dir)
    HydraConfig.instance().set_config(cfg)
    interrupter = Interrupter(point, validations)
    build = train_module.build_trainer

    def build_with_interrupter(config):
        trainer = build(config)
        trainer.callbacks.insert(0, interrupter)
        return trainer

    train_module.build_trainer = build_with_interrupter
    try:
        train_module.train(cfg)
    except (Killed, SystemExit):  # SystemExit: Lightning's SIGTERMException after the signal checkpoint
        assert interrupter.fired
        return True
    finally:
        train_module.build_trainer = build
    assert point is None, f"{point} was never reached"
    return False


def last_validations(validations: list) -> dict[int, tuple]:
    return {epoch: (step, ap) for epoch, step, ap in validations}


@pytest.mark.slow
def test_killed_at_many_points_including_validation_and_epoch_boundaries_equals_uninterrupted(compose_cfg, tmp_path):
    data_dir = tmp_path / "data"
    straight_validations: list = []
    run_chain_part(compose_cfg, tmp_path / "straight", data_dir, None, straight_validations, resume=False)

    killed_dir, validations = tmp_path / "killed", []
    for number, point in enumerate(KILLS):
        assert run_chain_part(compose_cfg, killed_dir, data_dir, point, validations, resume=number > 0)
    run_chain_part(compose_cfg, killed_dir, data_dir, None, validations, resume=True)

    straight, resumed = final_state(tmp_path / "straight"), final_state(killed_dir)
    assert (straight["global_step"], resumed["global_step"]) == (CHAIN_STEPS, CHAIN_STEPS)
    assert straight["epoch"] == resumed["epoch"]
    assert_identical(straight["state_dict"], resumed["state_dict"], "state_dict")
    assert_identical(straight["ema_state_dict"], resumed["ema_state_dict"], "ema_state_dict")
    assert_identical(straight["optimizer_states"], resumed["optimizer_states"], "optimizer_states")
    assert_identical(straight["lr_schedulers"], resumed["lr_schedulers"], "lr_schedulers")
    # every epoch validated, with the uninterrupted run's AP at the same step
    assert last_validations(validations) == last_validations(straight_validations)
    assert sorted(last_validations(validations)) == [0, 1]
    scores = [next(v["best_model_score"] for k, v in s["callbacks"].items() if "val/AP" in k)
              for s in (straight, resumed)]
    assert_identical(scores[0], scores[1], "best val/AP")
    # the resumed runs appended to the metrics file: every epoch's validation row is there
    rows = (killed_dir / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = {row.split(",")[header.index("epoch")] for row in rows[1:] if row.split(",")[header.index("val/AP")]}
    assert epochs == {"0", "1"}
