"""``AtomicCheckpointIO``: Lightning checkpoints written so that a crash while saving never leaves only a broken file.

Lightning's own ``TorchCheckpointIO`` serialises into memory and moves an fsspec temporary file from the system
temp directory onto the target; when that directory is on another file system the move is a copy that writes the
target in place, and nothing is fsync'ed. Here the bytes go to a temporary file *in the target's directory*, are
flushed and fsync'ed, and ``os.replace`` swaps it in (atomic on POSIX within one file system); the directory is
fsync'ed too, so the rename survives a power loss. Remote URLs (``s3://`` ...) keep Lightning's behaviour. A write
that fails (full disk, read-only file system) removes its temporary file, leaves the previous checkpoint untouched
and raises :class:`codetr.utils.run_guard.RunEnvironmentError` naming the file, the free space and what to do.

The file is created with the process umask applied (like any other file the run writes; ``tempfile.mkstemp``
would make it 0600). A process killed during a write leaves its ``.<name>.<8 characters>.tmp`` behind (a
checkpoint's size each); :func:`remove_interrupted_writes` deletes those when the next run starts in the
directory (under the run lock, so no live writer is touched).
"""

from __future__ import annotations

import io
import logging
import os
import re
import secrets
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from codetr.utils.run_guard import RunEnvironmentError, describe_write_error

log = logging.getLogger(__name__)
# ".last.ckpt.k3j9x_a2.tmp": ours, and what tempfile.mkstemp (used before) named them
INTERRUPTED_WRITE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _fsync_directory(directory: Path) -> None:
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:  # some file systems (or Windows) do not open directories; the rename is done anyway
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new ``<dir>/.<name>.<random>.tmp`` opened for writing, mode 0666 minus the umask."""
    while True:
        temporary = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue


def remove_interrupted_writes(directory: str | Path) -> list[Path]:
    """Delete the temporary files that killed :func:`atomic_torch_save` calls left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [p for p in directory.iterdir() if p.is_file() and INTERRUPTED_WRITE.match(p.name)]
    size = sum(p.stat().st_size for p in removed)
    for path in removed:
        path.unlink(missing_ok=True)
    if removed:
        log.warning("removed %d partial checkpoint file(s) (%.1f MB) left by an interrupted run in %s", len(removed),
                    size / 2**20, directory)
    return removed


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj)`` to ``path`` via ``<dir>/.<name>.<random>.tmp`` + fsync + ``os.replace``; on any error the
    temporary file is removed and the previous ``path`` (if any) is untouched."""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise first: a failure here never touches the disk
    temporary: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = _create_temporary(path)
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(buffer.getbuffer())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:  # full disk, read-only file system, lost permission: one clear line, old file kept
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        kept = " (the previous checkpoints there are intact)" if path.parent.is_dir() else ""
        raise RunEnvironmentError(error.errno, describe_write_error(error, path, "the checkpoint") + kept) from error
    except BaseException:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local saves go through :func:`atomic_torch_save`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options (got {storage_options!r})")
        protocol = get_filesystem(path).protocol
        if "file" not in (protocol if isinstance(protocol, tuple) else (protocol,)):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, str(path).removeprefix("file://"))
