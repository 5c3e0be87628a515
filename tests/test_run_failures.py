"""A run that cannot write ends with one line that names the directory / file and what to do, and loses nothing:
an unwritable run directory is refused before Hydra sets up its logging, a full disk while writing a checkpoint
leaves the previous one intact, a second run refused by the run lock leaves the first run's ``.hydra`` record
alone, and a run stopped by Ctrl-C / SIGTERM exits with 130 / 143 after writing ``last.ckpt``."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from codetr.utils.run_lock import LOCK_NAME, process_start_time

RUN = [
    "experiment=demo", "data.generate.num_train=16", "data.generate.num_val=2", "data.generate.image_size=64",
    "data.batch_size=2", "aug.scales=[64]", "aug.crop_scales=[64]", "aug.crop_size=[48,64]", "aug.test_scale=64",
    "trainer.max_epochs=1", "logger=csv",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": ""}


def run(args: list[str], prelude: str = "", timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m codetr.train ARGS`` with stdout/stderr captured (not a terminal); ``prelude``: Python run
    first in the same process (fault injection)."""
    code = f"{prelude}\nimport runpy, sys\nsys.argv = ['codetr.train', *{args!r}]\n" \
           "runpy.run_module('codetr.train', run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, timeout=timeout,
                          check=False)


def one_line_error(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.stderr.strip().splitlines()[-1]


def test_a_run_directory_behind_a_file_is_refused_with_one_line(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    line = one_line_error(run([*RUN, f"hydra.run.dir={blocker / 'run'}"]))
    assert line.startswith(f"codetr: cannot write the run directory {blocker / 'run'}: Not a directory")
    assert "paths.log_dir=" in line


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr (an immutable directory, root included)")
def test_a_read_only_run_directory_is_refused_before_hydra_logging(tmp_path):
    run_dir = tmp_path / "frozen"
    run_dir.mkdir()
    if subprocess.run(["chattr", "+i", str(run_dir)], capture_output=True, check=False).returncode != 0:
        pytest.skip("this file system has no immutable attribute")
    try:
        line = one_line_error(run([*RUN, f"hydra.run.dir={run_dir}"]))
    finally:
        subprocess.run(["chattr", "-i", str(run_dir)], check=False)
    assert line.startswith(f"codetr: cannot write the run directory {run_dir}: Operation not permitted")
    assert "Unable to configure handler" not in line


FULL_DISK_ON_SECOND_SAVE = """
import errno, os
import codetr.lightning.checkpoint_io as checkpoint_io
calls = []
real = os.fdopen
def fdopen(descriptor, *args, **kwargs):
    handle = real(descriptor, *args, **kwargs)
    if not os.readlink(f"/proc/self/fd/{descriptor}").endswith(".tmp"):  # not a checkpoint write
        return handle
    calls.append(descriptor)
    if len(calls) >= 2:
        def write(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        handle.write = write
    return handle
checkpoint_io.os.fdopen = fdopen
"""


def test_a_full_disk_while_checkpointing_ends_with_one_line_and_keeps_the_last_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, "trainer.max_epochs=2", "callbacks.step_checkpoint.every_n_train_steps=3", f"hydra.run.dir={run_dir}"]
    line = one_line_error(run(args, FULL_DISK_ON_SECOND_SAVE))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert line.startswith(f"codetr: cannot write the checkpoint {run_dir / 'checkpoints'}/")
    assert "No space left on device" in line and "MiB free there" in line and "previous checkpoints" in line
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3  # the first save, intact
    assert not [p for p in last.parent.iterdir() if p.name.endswith(".tmp")]


def test_a_run_refused_by_the_lock_leaves_the_running_runs_hydra_record_alone(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    record = "seed: 1\n"
    (run_dir / ".hydra" / "config.yaml").write_text(record)
    (run_dir / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
    pid = os.getpid()  # a live holder: this test process
    holder = {"host": socket.gethostname(), "pid": pid, "started": process_start_time(pid), "slurm_job_id": None,
              "since": "now"}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))
    line = one_line_error(run([*RUN, "seed=2", f"hydra.run.dir={run_dir}"]))
    assert line.startswith(f"codetr: {run_dir} is in use by another run (pid {pid}")
    assert (run_dir / ".hydra" / "config.yaml").read_text() == record
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == "- seed=1\n"


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_run_stopped_by_a_signal_writes_last_ckpt_and_exits_128_plus_the_signal(tmp_path, signum, status):
    run_dir = tmp_path / "run"
    out = tmp_path / "out.txt"
    args = [*RUN, "trainer.max_epochs=3", "callbacks.progress_bar.every_n_steps=1",
            "callbacks.progress_bar.every_seconds=0", f"hydra.run.dir={run_dir}"]
    with out.open("w") as handle:
        process = subprocess.Popen([sys.executable, "-m", "codetr.train", *args], env=ENV, stdout=handle,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while "epoch 0 step 2/" not in out.read_text() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, out.read_text()[-3000:]
    process.send_signal(signum)
    assert process.wait(timeout=300) == status, out.read_text()[-3000:]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert 0 < state["global_step"] < 24
    assert Path(run_dir / "train.log").exists()
