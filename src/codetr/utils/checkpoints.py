"""Reading detector weights from Lightning checkpoints and converted official checkpoints.

Accepted files (always read with ``torch.load(weights_only=True)``: no pickled code is executed):
* Lightning ``.ckpt`` written by :class:`codetr.lightning.CoDETRModule` (``state_dict`` with ``detector.*`` keys,
  optionally ``ema_state_dict`` from :class:`codetr.lightning.callbacks.ExpMomentumEMA`);
* converted official checkpoints ``{"state_dict": {"detector.<name>": tensor}}`` (``python -m codetr.convert``);
* a bare detector state dict (``backbone.*``, ``query_head.*``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from codetr.checkpoint_io import load_weights_file

PREFIX = "detector."


def read_detector_state(path: str | Path, prefer_ema: bool = True) -> dict[str, Tensor]:
    """Detector state dict (keys without the ``detector.`` prefix) from ``path``."""
    # weights_only=True; refuses pickled code with a clear error
    return detector_state(load_weights_file(path), prefer_ema)


def detector_state(checkpoint: Mapping[str, Any], prefer_ema: bool = True) -> dict[str, Tensor]:
    """Detector state dict (keys without the ``detector.`` prefix) from a loaded checkpoint dict."""
    state = checkpoint
    if prefer_ema and isinstance(checkpoint.get("ema_state_dict"), dict):
        state = checkpoint["ema_state_dict"]
    elif isinstance(checkpoint.get("state_dict"), dict):
        state = checkpoint["state_dict"]
    if any(k.startswith(PREFIX) for k in state):
        state = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return {k: v for k, v in state.items() if isinstance(v, Tensor)}


def load_detector_weights(detector: nn.Module, path: str | Path, prefer_ema: bool = True,
                          same_classes: bool = False) -> list[str]:
    """Load ``path`` into ``detector`` (:func:`codetr.convert.load_detector_weights` rules): class-dependent tensors
    whose shape differs (another number of classes, e.g. Objects365 -> COCO) keep their fresh initialisation and
    are returned; any other missing / unexpected key or shape mismatch raises.

    With ``same_classes`` (evaluation: re-initialised class heads would score a random classifier) a checkpoint
    trained for another number of classes raises ``ValueError`` naming the file and both numbers."""
    from codetr.convert import is_class_dependent, num_classes_of
    from codetr.convert import load_detector_weights as load_converted

    state = read_detector_state(path, prefer_ema)
    if same_classes:
        own = detector.state_dict()
        differing = sorted(k for k in own if is_class_dependent(k) and (k not in state or state[k].shape != own[k].shape))
        if differing:
            theirs, ours = num_classes_of(state), num_classes_of(own)
            raise ValueError(
                f"{path} was trained for {theirs if theirs is not None else 'an unknown number of'} classes, the "
                f"config / dataset has {ours} (data.num_classes): evaluate it with the dataset and class count it was "
                f"trained on (differing class-dependent tensors: {', '.join(differing[:4])}"
                f"{' ...' if len(differing) > 4 else ''})")
    return load_converted(detector, state, strict_classes=False)


def load_detector_weights_from(detector: nn.Module, checkpoint: Mapping[str, Any], prefer_ema: bool = True,
                               strict_classes: bool = True, source: str = "checkpoint") -> list[str]:
    """:func:`load_detector_weights` from an already loaded checkpoint dict; errors name ``source``."""
    from codetr.convert import ConversionError
    from codetr.convert import load_detector_weights as load_converted

    try:
        return load_converted(detector, detector_state(checkpoint, prefer_ema), strict_classes=strict_classes)
    except ConversionError as error:
        raise ConversionError(f"{source}: {error}") from error
