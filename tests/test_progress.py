"""A run whose output is not a terminal (SLURM, nohup, ``> file``) reports progress as plain lines, in the console
and in ``train.log``, while the epoch runs; a terminal gets the rich bar."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from lightning.pytorch.callbacks import RichProgressBar

from codetr.lightning.progress import TextProgress, progress_bar

RUN = [
    "experiment=demo", "data.generate.num_train=16", "data.generate.num_val=2", "data.generate.image_size=64",
    "data.batch_size=2", "aug.scales=[64]", "aug.crop_scales=[64]", "aug.crop_size=[48,64]", "aug.test_scale=64",
    "trainer.max_epochs=1", "logger=csv", "callbacks.progress_bar.every_n_steps=3",
    "callbacks.progress_bar.every_seconds=0",
]
LINE = re.compile(r"epoch 0 step (\d+)/8 \(global \d+\) \| [\d.]+ images/s \| eta epoch [\d:?]+, run [\d:?]+ \| "
                  r"loss [\d.]+ \| lr [\d.e-]+ \| peak [\d.]+ GiB (rss|gpu)")


def test_a_run_with_stdout_in_a_file_prints_progress_lines_to_the_console_and_train_log(tmp_path):
    run_dir = tmp_path / "run"
    console = tmp_path / "stdout.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with console.open("w") as out:  # a file, not a terminal: what SLURM and nohup give the job
        command = [sys.executable, "-m", "codetr.train", *RUN, f"hydra.run.dir={run_dir}"]
        done = subprocess.run(command, env=env, check=False, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    text = console.read_text()
    assert done.returncode == 0, text[-3000:]
    steps = [int(m.group(1)) for m in LINE.finditer(text)]
    assert steps == [3, 6, 8], text[-3000:]  # every 3 steps, and the epoch's last batch
    log_text = (run_dir / "train.log").read_text()
    assert [int(m.group(1)) for m in LINE.finditer(log_text)] == steps
    assert "training: 8 optimiser steps in all, 8 batches per epoch" in log_text
    assert "validation done in" in log_text and "epoch 0 done in" in log_text
    assert not re.search(r"Epoch \d+/\S+ ━", text)  # no rich bar rendered into the file


def test_a_terminal_gets_the_rich_bar_and_a_file_the_text_lines():
    assert isinstance(progress_bar(force_text=False), RichProgressBar)
    assert isinstance(progress_bar(force_text=True), TextProgress)


def test_text_progress_refuses_negative_intervals():
    import pytest

    with pytest.raises(ValueError, match="every_n_steps"):
        TextProgress(every_n_steps=-1)
    assert Path(__file__).exists()
