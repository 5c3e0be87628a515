"""SIGTERM and Ctrl-C write last.ckpt before the process stops and the run resumes from it (a second Ctrl-C stops
at once); SLURM's requeue signal writes an hpc checkpoint and calls `scontrol requeue <job id>` (real signals,
delivered to this process). SIGTERM / Ctrl-C during validation: tests/test_resume_exact.py."""

from __future__ import annotations

import os
import signal
import stat

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.environments import SLURMEnvironment
from test_nonfinite import OPTIMIZER, SCHEDULER, ScriptedDetector, batches

from codetr.lightning import CoDETRModule
from codetr.lightning.signals import CheckpointOnSignal

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX signals")


class SendSignal(pl.Callback):
    def __init__(self, signum: int, at_batch: int, times: int = 1):
        self.signum, self.at_batch, self.times = signum, at_batch, times

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_batch:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


def make_trainer(tmp_path, steps: int, *callbacks, plugins=None) -> pl.Trainer:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True, save_top_k=0)
    return pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, plugins=plugins,
                      callbacks=[checkpoint, CheckpointOnSignal(), *callbacks])


def module() -> CoDETRModule:
    return CoDETRModule(ScriptedDetector({}), OPTIMIZER, SCHEDULER)


def loader(count: int = 8):
    return torch.utils.data.DataLoader(batches(count), batch_size=None)


def test_sigterm_writes_last_checkpoint_and_the_run_resumes(tmp_path):
    previous = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, 8, SendSignal(signal.SIGTERM, at_batch=3)).fit(module(), loader())
    finally:
        signal.signal(signal.SIGTERM, previous)
    last = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 4  # the batch running when the signal came was finished first
    resumed = make_trainer(tmp_path, 8)
    resumed.fit(module(), loader(), ckpt_path="last")
    assert resumed.global_step == 8


def test_ctrl_c_writes_last_checkpoint_like_sigterm_and_the_run_resumes(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):
            make_trainer(tmp_path, 8, SendSignal(signal.SIGINT, at_batch=3)).fit(module(), loader())
        assert signal.getsignal(signal.SIGINT) == previous  # our handler is gone after the fit
    finally:
        signal.signal(signal.SIGINT, previous)
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    resumed = make_trainer(tmp_path, 8)
    resumed.fit(module(), loader(), ckpt_path="last")
    assert resumed.global_step == 8


def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stopped:
            make_trainer(tmp_path, 8, SendSignal(signal.SIGINT, at_batch=3, times=2)).fit(module(), loader())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert stopped.value.code == 1
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_slurm_requeue_signal_writes_hpc_checkpoint_and_requeues(tmp_path, monkeypatch):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    for key, value in {"SLURM_JOB_ID": "4321", "SLURM_NTASKS": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
                       "SLURM_NODEID": "0", "SLURM_JOB_NAME": "codetr", "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        trainer = make_trainer(tmp_path, 6, SendSignal(signal.SIGUSR1, at_batch=2),
                               plugins=[SLURMEnvironment(auto_requeue=True)])
        trainer.fit(module(), loader())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert calls.read_text().split() == ["requeue", "4321"]
    hpc = sorted(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1 and torch.load(hpc[0], weights_only=True)["global_step"] >= 2
