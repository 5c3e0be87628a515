"""The run directory: one run at a time (a lock naming its holder, released on exit and crash, stale locks of dead
processes taken over), ckpt_path=last is an error in a fresh directory (last_if_exists is not), partial files of
killed checkpoint writes are removed at start, metrics.csv keeps the rows of earlier runs; config keys that nothing
reads are refused naming the valid ones."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.callbacks import ModelCheckpoint

from codetr.data.datamodule import check_aug_keys
from codetr.lightning.csv_logger import AppendingCSVLogger
from codetr.lightning.optim import check_optim_config
from codetr.lightning.resume import remove_partial_checkpoints, resolve_ckpt_path
from codetr.train import build_module, check_config_keys, train
from codetr.utils.run_lock import LOCK_NAME, RunDirectoryLockedError, RunLock

TINY = ["experiment=demo", "data.generate.num_train=4", "data.generate.num_val=2", "data.generate.image_size=64",
        "aug.scales=[64]", "aug.crop_scales=[64]", "aug.crop_size=[48,64]", "aug.test_scale=64", "callbacks=default",
        "~callbacks.progress_bar", "trainer.max_epochs=1", "+trainer.limit_train_batches=1",
        "+trainer.limit_val_batches=1"]


def test_a_second_run_in_a_locked_directory_is_refused_naming_the_holder(compose_cfg):
    cfg = compose_cfg("train", TINY)
    run_dir = Path(cfg.paths.output_dir)
    with RunLock(run_dir):
        with pytest.raises(RunDirectoryLockedError, match=rf"pid {os.getpid()} on {socket.gethostname()}"):
            train(cfg)
        assert (run_dir / LOCK_NAME).is_file()  # the refused run did not take the holder's lock away
    assert not (run_dir / LOCK_NAME).exists()


def test_the_lock_is_released_when_the_run_fails(compose_cfg, tmp_path):
    cfg = compose_cfg("train", [*TINY, f"data.datamodule.train_annotations={tmp_path / 'missing.json'}"])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        train(cfg)
    assert not (Path(cfg.paths.output_dir) / LOCK_NAME).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = {"host": socket.gethostname(), "pid": int(finished.stdout), "started": None, "slurm_job_id": None}
    (tmp_path / LOCK_NAME).write_text(json.dumps(dead))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    elsewhere = {**dead, "host": "another-host"}  # cannot be checked from here: refused, naming the file to delete
    (tmp_path / LOCK_NAME).write_text(json.dumps(elsewhere))
    with pytest.raises(RunDirectoryLockedError, match=rf"on another-host.*delete {tmp_path / LOCK_NAME}"):
        RunLock(tmp_path).acquire()


def test_a_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4321")
    (tmp_path / LOCK_NAME).write_text(json.dumps({"host": "node-7", "pid": 1, "slurm_job_id": "4321"}))
    with RunLock(tmp_path):
        pass


def trainer_in(tmp_path) -> pl.Trainer:
    return pl.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                      callbacks=[ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)])


def test_ckpt_path_last_in_a_fresh_directory_is_an_error_unless_last_if_exists(tmp_path):
    trainer = trainer_in(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last: no checkpoint to resume in .*checkpoints.*"
                                                r"last_if_exists"):
        resolve_ckpt_path(trainer, "last")
    assert resolve_ckpt_path(trainer, "last_if_exists") is None
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path(trainer, "last") == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(trainer, "last_if_exists") == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(trainer, "some/file.ckpt") == "some/file.ckpt"


def test_ckpt_path_last_in_a_fresh_run_directory_stops_the_run(compose_cfg):
    with pytest.raises(FileNotFoundError, match="ckpt_path=last: no checkpoint to resume"):
        train(compose_cfg("train", [*TINY, "ckpt_path=last"]))


def test_partial_checkpoint_files_of_killed_writes_are_removed_at_start(tmp_path):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    partial = [folder / ".last.ckpt.k3j9x_a2.tmp", folder / ".epoch_000.ckpt.0a1b2c3d.tmp", tmp_path / ".hpc_ckpt_1"
               ".ckpt.zzzzzzzz.tmp"]
    kept = [folder / "last.ckpt", folder / "notes.tmp", folder / ".hidden"]
    for path in partial + kept:
        path.write_bytes(b"0" * 10)
    assert remove_partial_checkpoints(trainer_in(tmp_path)) == len(partial)
    assert not any(p.exists() for p in partial) and all(p.exists() for p in kept)


def test_metrics_csv_keeps_the_rows_of_earlier_runs(tmp_path):
    first = AppendingCSVLogger(tmp_path, name="csv", version="")
    first.log_metrics({"train/loss": 3.0, "epoch": 0}, step=0)
    first.finalize("success")
    second = AppendingCSVLogger(tmp_path, name="csv", version="")  # the resumed run, same directory
    second.log_metrics({"train/loss": 2.0, "epoch": 1}, step=1)
    second.log_metrics({"val/AP": 0.5, "epoch": 1}, step=1)  # a new column widens the header
    second.finalize("success")
    lines = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    assert lines[0] == "epoch,step,train/loss,val/AP"
    assert lines[1:] == ["0,0,3.0,", "1,1,2.0,", "1,1,,0.5"]


UNKNOWN = {
    "+optimizer.learning_rate=0.1": r"optimizer.learning_rate: nothing reads them; the keys of optimizer are "
                                    r"backbone_lr_mult, betas",
    "+scheduler.step=3": r"scheduler.step.*the keys of scheduler are gamma, milestone_table, milestones",
    "+aug.scale=[64]": r"aug.scale.*the keys of aug are crop_max_size, crop_scales",
    "+nonfinite.max_consecutve=3": r"nonfinite.max_consecutve.*the keys of nonfinite are check, max_consecutive",
    "+model.compile.enable=true": r"model.compile.enable.*backend, dynamic, enabled",
    "+callbacks.checkpoint_every=5": r"callbacks.checkpoint_every is not a callback to build",
}


@pytest.mark.parametrize("override", sorted(UNKNOWN))
def test_config_keys_that_nothing_reads_are_refused_naming_the_valid_ones(compose_cfg, override):
    cfg = compose_cfg("train", ["experiment=demo", override])
    with pytest.raises(ValueError, match=UNKNOWN[override]):
        check_config_keys(cfg)
        check_aug_keys(cfg.aug)
        build_module(cfg)


def test_every_experiment_uses_only_keys_that_are_read(compose_cfg):
    for experiment in sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")):
        cfg = compose_cfg("train", [f"experiment={experiment}"])
        check_config_keys(cfg)
        check_aug_keys(cfg.aug)
        check_optim_config(cfg.optimizer, cfg.scheduler)
