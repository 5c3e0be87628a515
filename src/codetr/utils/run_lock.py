"""One training run per run directory: ``<run dir>/run.lock`` holds the owner (host, pid, process start time,
SLURM job id) while a run writes there, and a second run started into the same directory is refused, naming it.

The lock is released when the run ends, crash included (``RunLock`` is a context manager). A lock left behind by
a killed run (SIGKILL, OOM killer, power loss) is stale and taken over with a warning when its owner is provably
gone: same host and the pid is not running (or runs a process started at another time: the pid was reused), or
the same SLURM job id (a requeued job resumes its own directory). A lock held from another host cannot be checked
from here; the error says which file to delete if that run is dead.

Only the global rank 0 process locks: the other DDP ranks share the directory on purpose.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")


def is_launcher_rank_zero() -> bool:
    """True unless a launcher (torchrun, SLURM, Lightning's DDP launcher, multi-node) says this is another rank."""
    return all(os.environ.get(name, "0") == "0" for name in RANK_VARIABLES)


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``); None where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[19] if len(fields) > 19 else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


# lock files taken by this process for the job it is about to run (codetr.utils.run_guard, before Hydra writes
# its record); the job's own RunLock on the same directory then joins instead of refusing
_TAKEN_BEFORE_THE_JOB: set[Path] = set()


def hold_for_the_job(lock: RunLock) -> None:
    """Takes ``lock`` and lets the job's own :class:`RunLock` on the same directory join it."""
    lock.acquire()
    if lock.enabled:
        _TAKEN_BEFORE_THE_JOB.add(lock.path)


def release_after_the_job(lock: RunLock) -> None:
    _TAKEN_BEFORE_THE_JOB.discard(lock.path)
    lock.release()


class RunDirectoryLockedError(RuntimeError):
    """Another run holds the run directory."""


class RunLock:
    """``with RunLock(run_dir): ...`` -- see the module docstring. ``enabled=False`` makes it a no-op."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / LOCK_NAME
        self.enabled = enabled
        self._nested = False  # this process already held the lock (taken earlier by the Hydra run guard)
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": process_start_time(os.getpid()),
                      "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _stale(self, holder: dict[str, Any]) -> bool:
        if self.owner["slurm_job_id"] and holder.get("slurm_job_id") == self.owner["slurm_job_id"]:
            return True
        if holder.get("host") != self.owner["host"] or not isinstance(holder.get("pid"), int):
            return False
        pid = holder["pid"]
        if not _running(pid):
            return True
        started = process_start_time(pid)
        return started is not None and holder.get("started") is not None and started != holder["started"]

    def _read_holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _try_create(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as handle:
            json.dump(self.owner, handle)
        return True

    def acquire(self) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock is removed once; a racing starter then sees the winner's lock
            if self._try_create():
                return
            holder = self._read_holder()
            if self.path in _TAKEN_BEFORE_THE_JOB and all(
                holder.get(k) == self.owner[k] for k in ("host", "pid", "started")
            ):
                self._nested = True  # taken by codetr.utils.run_guard before Hydra wrote anything: ours
                return
            if not holder or not self._stale(holder):
                break
            log.warning("%s: taking over a stale lock of a run that is gone (%s)", self.path, _describe(holder))
            self.path.unlink(missing_ok=True)
        holder = self._read_holder()
        raise RunDirectoryLockedError(
            f"{self.path.parent} is in use by another run ({_describe(holder) or 'owner unreadable'}): two runs in "
            f"one directory overwrite each other's checkpoints and metrics. Use another hydra.run.dir, wait for that "
            f"run to end, or delete {self.path} if that run is dead.")

    def release(self) -> None:
        if self._nested:
            self._nested = False
            return
        holder = self._read_holder()
        if self.enabled and (holder.get("pid"), holder.get("host")) == (self.owner["pid"], self.owner["host"]):
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None):
        self.release()


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return ""
    slurm = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{slurm}, since {holder.get('since')}"
