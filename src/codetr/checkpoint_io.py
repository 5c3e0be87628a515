"""Everything about reading checkpoints and weight files into codetr models: reading files safely (below), the
detector's state in a checkpoint and the rules for loading it (:func:`load_detector_weights`, see the section
"detector weights"). Writing training checkpoints is :mod:`codetr.lightning.checkpoint_io`; renaming official
checkpoints is :mod:`codetr.convert`.

* :func:`load_weights_file` always uses ``torch.load(weights_only=True)``: a pickle that would run code is refused
  with a message naming the file instead of being executed.
* :func:`unwrap_state_dict` takes the tensor dict out of the usual containers (``state_dict`` / ``model`` /
  ``module``) and strips a ``module.`` prefix left by DataParallel / DDP.
* :func:`require_online` fails fast (a few seconds) with a clear message when a download host cannot be reached, so
  that a pretrained-backbone download (:mod:`codetr.models.backbones.pretrained`) never hangs on an offline machine.
"""

from __future__ import annotations

import logging
import pickle
import re
import socket
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

CONTAINER_KEYS = ("state_dict", "model", "module")
PREFIX = "detector."
# Tensors whose size follows the number of classes K (codetr names): the main head's classifiers, the denoising
# label embedding, the ATSS classifier and the RoI head's classifier / class-specific box regressor.
CLASS_DEPENDENT = [
    r"query_head\.cls_branches\.\d+\.(weight|bias)",
    r"query_head\.dn_generator\.label_embedding\.weight",
    r"bbox_head\.\d+\.atss_cls\.(weight|bias)",
    r"roi_head\.\d+\.bbox_head\.fc_(cls|reg)\.(weight|bias)",
    # mask branch: per-class stage classifiers (a class-agnostic last stage has 1 row, kept across class counts by
    # the shape check) and the mask-IoU classes
    r"mask_branch\.mask_head\.stage_instance_logits\.\d+\.(weight|bias)",
    r"mask_branch\.mask_iou_head\.fc_mask_iou\.(weight|bias)",
]


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


# ---------------------------------------------------------------------------------------------- detector weights
#
# - Checkpoints hold the detector under ``detector.<mmdet-like name>`` keys (:data:`PREFIX`): Lightning ``.ckpt``
#   files written by :class:`codetr.lightning.CoDETRModule` (``state_dict``, and ``ema_state_dict`` from
#   :class:`codetr.lightning.callbacks.ExpMomentumEMA`), converted official checkpoints
#   (``{"state_dict": {"detector.<name>": tensor}}``, ``python -m codetr.convert``); a bare detector state dict
#   (``backbone.*``, ``query_head.*``, ...) is accepted too. :func:`detector_state` takes it out (EMA preferred).
# - :func:`load_detector_weights` loads one into a detector: every key must match in name and shape, except the
#   class-dependent tensors (:data:`CLASS_DEPENDENT`), which may differ in size when the class count changes
#   (e.g. Objects365 -> COCO): with ``strict_classes=False`` they keep their fresh initialisation, with ``True``
#   (evaluation, prediction) that is an error naming the file and both class counts.


class CheckpointMismatchError(ValueError):
    """A state dict does not fit the model: unexpected or missing keys, other shapes, or another class count."""


def is_class_dependent(key: str) -> bool:
    return any(re.fullmatch(p, key) for p in CLASS_DEPENDENT)


def num_classes_of(state: Mapping[str, Tensor]) -> int | None:
    """K from the first classification branch (``query_head.cls_branches.0.weight`` rows)."""
    for key in ("query_head.cls_branches.0.weight", "query_head.cls_branches.0.bias"):
        if key in state:
            return int(state[key].shape[0])
    return None


def check_against(
    state: Mapping[str, Tensor],
    expected: Mapping[str, Sequence[int] | torch.Size],
    allowed_missing: set[str] = frozenset(),
) -> None:
    """Raise :class:`CheckpointMismatchError` listing unexpected keys, missing keys and shape mismatches."""
    unexpected = sorted(k for k in state if k not in expected)
    missing = sorted(k for k in expected if k not in state and k not in allowed_missing)
    mismatched = sorted(
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k])}"
        for k, v in state.items()
        if k in expected and tuple(v.shape) != tuple(expected[k])
    )
    problems = []
    if unexpected:
        problems.append(f"keys not in the model ({len(unexpected)}): {', '.join(unexpected)}")
    if missing:
        problems.append(f"model keys missing from the checkpoint ({len(missing)}): {', '.join(missing)}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched)}")
    if problems:
        raise CheckpointMismatchError("checkpoint does not match the expected layout:\n  " + "\n  ".join(problems))


def detector_state(checkpoint: Mapping[str, Any], prefer_ema: bool = True) -> dict[str, Tensor]:
    """Detector state dict (keys without the ``detector.`` prefix) from a loaded checkpoint dict: its
    ``ema_state_dict`` (when ``prefer_ema``) or ``state_dict``, or the dict itself (a bare state dict)."""
    state = checkpoint
    if prefer_ema and isinstance(checkpoint.get("ema_state_dict"), Mapping):
        state = checkpoint["ema_state_dict"]
    elif isinstance(checkpoint.get("state_dict"), Mapping):
        state = checkpoint["state_dict"]
    if any(str(k).startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def load_detector_weights(detector: nn.Module, checkpoint: str | Path | Mapping[str, Any], prefer_ema: bool = True,
                          strict_classes: bool = True, source: str | None = None) -> list[str]:
    """Loads ``checkpoint`` (a file, read with ``weights_only=True``, or an already loaded checkpoint / state dict)
    into ``detector``; returns the class-dependent keys that kept their initialisation.

    Every key must exist on both sides with the same shape (:class:`CheckpointMismatchError` listing all that do
    not), except class-dependent tensors of another size: re-initialised (and logged) when ``strict_classes`` is
    False, an error naming ``source`` (default: the file) and both class counts when it is True.
    """
    source = source or (str(checkpoint) if isinstance(checkpoint, str | Path) else "checkpoint")
    loaded = load_weights_file(checkpoint) if isinstance(checkpoint, str | Path) else checkpoint
    state = detector_state(loaded, prefer_ema)
    own = detector.state_dict()
    differing = sorted(k for k in own if is_class_dependent(k) and (k not in state or state[k].shape != own[k].shape))
    if differing and strict_classes:
        theirs, ours = num_classes_of(state), num_classes_of(own)
        raise CheckpointMismatchError(
            f"{source} was trained for {theirs if theirs is not None else 'an unknown number of'} classes, the "
            f"config / dataset has {ours} (data.num_classes): use it with the class count it was trained on, or "
            f"fine-tune it (training re-initialises the class-dependent tensors: {', '.join(differing[:4])}"
            f"{' ...' if len(differing) > 4 else ''})")
    state = {k: v for k, v in state.items() if k not in differing}
    try:
        check_against(state, {k: v.shape for k, v in own.items()}, allowed_missing=set(differing))
    except CheckpointMismatchError as error:
        raise CheckpointMismatchError(f"{source}: {error}") from error
    detector.load_state_dict(state, strict=False)
    if differing:
        log.warning("re-initialised %d class-dependent tensors: %s", len(differing), ", ".join(differing))
    return differing
