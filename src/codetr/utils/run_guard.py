"""Checks of the run directory that must come before Hydra writes into it, and the one-line errors of a run that
cannot write.

Hydra creates the run directory, writes ``.hydra/config.yaml`` / ``overrides.yaml`` and opens ``<task>.log``
before the task function starts. Two things therefore go wrong there unless they are checked earlier:

* a directory that cannot be written (read-only mount, no permission) ended inside Hydra's logging set-up with
  ``Unable to configure handler 'file'``;
* a second training run started into a running run's directory was refused by the run lock only after Hydra had
  already rewritten the first run's ``.hydra`` record (its config then showed the second run's seed).

:class:`RunDirectoryGuard` is a Hydra callback (``conf/hydra/default.yaml``): at ``on_run_start`` it makes sure the
run directory can be written and, for training, takes the run lock (:class:`codetr.utils.run_lock.RunLock`) before
Hydra writes anything; the lock is released at ``on_run_end`` (and by the lock itself at exit). Failures end the
process with one line naming the directory and what to do (``SystemExit``: Hydra passes it through).

:class:`RunEnvironmentError` is the base of errors a user fixes outside the code (full disk, unwritable directory);
the entry points print its message as one line instead of a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from codetr.utils.run_lock import (
    RunDirectoryLockedError,
    RunLock,
    hold_for_the_job,
    is_launcher_rank_zero,
    release_after_the_job,
)

log = logging.getLogger(__name__)


class RunEnvironmentError(OSError):
    """The run cannot write where it must (full disk, read-only or missing permission); the message says where and
    what to do."""


def free_space(path: Path) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent), e.g. ``"12.3 MiB"``."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"


def describe_write_error(error: OSError, path: Path, what: str) -> str:
    """One line for a failed write of ``what`` at ``path``: the cause, the free space on a full disk, what to do."""
    cause = os.strerror(error.errno) if error.errno else str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = (f"{free_space(path)} free there; free space or move the run (paths.log_dir=<another disk>), then "
                  "resume with ckpt_path=last")
    elif error.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        advice = "choose a writable place with paths.log_dir=<dir> (or hydra.run.dir=<dir>)"
    else:
        advice = "check the file system, then resume with ckpt_path=last"
    return f"cannot write {what} {path}: {cause}; {advice}"


def check_writable(directory: Path) -> None:
    """Creates ``directory`` (with parents) and writes a probe file there; raises :class:`RunEnvironmentError`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".codetr-write-probe-{os.getpid()}"
        with probe.open("w") as handle:
            handle.write("ok")
        probe.unlink()
    except OSError as error:
        raise RunEnvironmentError(error.errno, describe_write_error(error, directory, "the run directory")) from error


class RunDirectoryGuard(Callback):
    """Hydra callback (module docstring). ``lock_configs``: the primary configs (``config_name`` of the entry point:
    ``train``) whose run directory is locked."""

    def __init__(self, lock_configs: list[str] | tuple[str, ...] = ("train",)):
        self.lock_configs = tuple(lock_configs)
        self._lock: RunLock | None = None

    def on_run_start(self, config: DictConfig, config_name: str | None = None, **kwargs: Any) -> None:
        run_dir = Path(str(config.hydra.run.dir)).absolute()
        try:
            check_writable(run_dir)
        except RunEnvironmentError as error:
            raise SystemExit(f"codetr: {error.strerror}") from None
        if config_name in self.lock_configs:
            lock = RunLock(run_dir, enabled=is_launcher_rank_zero())
            try:
                hold_for_the_job(lock)
            except RunDirectoryLockedError as error:
                raise SystemExit(f"codetr: {error}") from None
            self._lock = lock

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir)).absolute()
        try:
            check_writable(sweep_dir)
        except RunEnvironmentError as error:
            raise SystemExit(f"codetr: {error.strerror}") from None

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self._lock is not None:
            release_after_the_job(self._lock)
            self._lock = None


def exit_on_environment_error(error: RunEnvironmentError) -> None:
    """Ends the process with the error's one line (exit status 1)."""
    log.error("%s", error.strerror)
    sys.exit(f"codetr: {error.strerror}")
