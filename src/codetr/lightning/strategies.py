"""``fsdp_strategy``: Lightning's ``FSDPStrategy`` configured from yaml with layer classes named by import path.

FSDP shards each wrapped unit separately, so the wrap policy decides the peak of parameter all-gathers: one unit per
encoder layer, decoder layer and backbone block (``wrap_layers``). ``checkpoint_layers`` applies FSDP's activation
checkpointing to those classes; do not combine it with ``model.encoder_checkpoint_layers`` or the ViT blocks'
``use_checkpoint`` on the same layers (that would recompute twice) -- set those to 0 / false under FSDP.
Checkpoints are saved as one full state dict (``state_dict_type="full"``) so they load on a single device.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def import_layer_class(path: str) -> type[nn.Module]:
    """``"package.module.ClassName"`` -> the class; a clear error names the path when it does not resolve."""
    module_name, _, class_name = path.rpartition(".")
    try:
        layer = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"FSDP layer class {path!r} cannot be imported: {error}") from error
    if not (isinstance(layer, type) and issubclass(layer, nn.Module)):
        raise TypeError(f"FSDP layer class {path!r} is not an nn.Module subclass")
    return layer


def fsdp_strategy(wrap_layers: Sequence[str] = (), checkpoint_layers: Sequence[str] = (),
                  state_dict_type: str = "full", **kwargs: Any) -> FSDPStrategy:
    """``FSDPStrategy(auto_wrap_policy={classes}, activation_checkpointing_policy={classes}, ...)``; other keyword
    arguments (``sharding_strategy``, ``cpu_offload``, ...) go to Lightning unchanged."""
    wrap = {import_layer_class(path) for path in wrap_layers}
    checkpoint = {import_layer_class(path) for path in checkpoint_layers}
    return FSDPStrategy(auto_wrap_policy=wrap or None, activation_checkpointing_policy=checkpoint or None,
                        state_dict_type=state_dict_type, **kwargs)
