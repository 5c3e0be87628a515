"""``AppendingCSVLogger``: Lightning's ``CSVLogger`` whose ``metrics.csv`` survives a resumed run.

Lightning's writer deletes an existing ``metrics.csv`` when it starts, so resuming a run in its own directory
(``hydra.run.dir=<run> ckpt_path=last``) lost the earlier epochs' rows. Here the rows are kept and new ones are
appended under the existing header (a new metric widens the header, old rows keep their values). Steps replayed
after a kill (those after the last checkpoint) appear twice; the later rows are the resumed run's.
"""

from __future__ import annotations

import csv
import os

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class AppendingExperimentWriter(ExperimentWriter):
    """``ExperimentWriter`` that continues an existing ``metrics.csv`` instead of deleting it."""

    def _check_log_dir_exists(self) -> None:
        if not self._fs.isfile(self.metrics_file_path):
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as handle:
            header = next(csv.reader(handle), [])
        self.metrics_keys = list(header)  # appended rows follow the columns of the file


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` (same arguments) writing through :class:`AppendingExperimentWriter`."""

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
