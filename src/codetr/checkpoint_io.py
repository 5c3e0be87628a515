"""Safe reading of weight files and guarded downloads of pretrained backbone weights.

* :func:`load_weights_file` always uses ``torch.load(weights_only=True)``: a pickle that would run code is refused
  with a message naming the file instead of being executed.
* :func:`unwrap_state_dict` takes the tensor dict out of the usual containers (``state_dict`` / ``model`` /
  ``module``) and strips a ``module.`` prefix left by DataParallel / DDP.
* :func:`require_online` fails fast (a few seconds) with a clear message when a download host cannot be reached, so
  that a pretrained-backbone download (:mod:`codetr.models.backbones.pretrained`) never hangs on an offline machine.
"""

from __future__ import annotations

import pickle
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

CONTAINER_KEYS = ("state_dict", "model", "module")


class UnsafeCheckpointError(ValueError):
    """The file is a pickle that needs arbitrary code to load; we refuse to unpickle it."""


def load_weights_file(path: str | Path) -> dict:
    """``torch.load(path, weights_only=True, map_location="cpu")`` with clear errors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeCheckpointError: the file contains pickled objects other than tensors / containers / plain values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UnsafeCheckpointError(
            f"{path}: refusing to load, the file contains pickled code or objects that are not plain weights "
            f"(torch.load(weights_only=True) failed: {str(error).splitlines()[0]}). Re-save the tensors only, e.g. "
            f"torch.save(ckpt['state_dict'], ...), in a trusted environment."
        ) from error
    if not isinstance(obj, Mapping):
        raise TypeError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def unwrap_state_dict(obj: Mapping, prefix_to_strip: str = "module.") -> dict[str, Tensor]:
    """Tensor dict from a checkpoint container: descends into ``state_dict`` / ``model`` / ``module`` while the
    dict has no tensors at its top level, drops non-tensor entries and strips a leading ``prefix_to_strip``."""
    state: Mapping = obj
    while not any(isinstance(v, Tensor) for v in state.values()):
        inner = next((state[k] for k in CONTAINER_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is None:
            break
        state = inner
    out = {}
    for key, value in state.items():
        if not isinstance(value, Tensor):
            continue
        if prefix_to_strip and key.startswith(prefix_to_strip):
            key = key[len(prefix_to_strip):]
        out[key] = value
    return out


def require_online(url: str, timeout: float = 5.0) -> None:
    """Raise ``RuntimeError`` within about ``2 * timeout`` seconds when the host of ``url`` cannot be reached
    (offline machine). The probe (DNS + TCP connect) runs in a daemon thread so a stalled resolver cannot hang."""
    parsed = urlparse(url)
    host = parsed.hostname or url
    port = parsed.port or (443 if parsed.scheme != "http" else 80)
    outcome: dict[str, object] = {}

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome["ok"] = True
        except OSError as error:
            outcome["error"] = error

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(2 * timeout)
    if not outcome.get("ok"):
        reason = outcome.get("error", f"no answer within {2 * timeout:.0f} s")
        raise RuntimeError(
            f"cannot download: {host} is not reachable ({reason}); this machine looks offline"
        )


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys starting with ``prefix`` (e.g. ``"backbone."``), prefix removed; the whole dict if none matches."""
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return sub if sub else dict(state)
