"""Sharded data parallelism from yaml, with layer classes named by import path.

* :class:`FullyShardedStrategy` (``trainer=fsdp``): FSDP2 -- ``torch.distributed.fsdp.fully_shard``, one shard group
  per parameter (DTensor) -- through Lightning's ``ModelParallelStrategy`` with a purely data-parallel mesh. Runs on
  GPUs (NCCL) and on CPUs (gloo), so it is tested end to end on the CPU.
* :func:`fsdp_strategy` (``trainer=fsdp1``): Lightning's ``FSDPStrategy`` (FSDP1, flat parameters; GPU only).

FSDP gathers each wrapped unit's parameters just before its forward and frees them after, so the wrap policy sets
the peak of parameter all-gathers: one unit per encoder layer, decoder layer and backbone block (``wrap_layers``),
plus the whole detector as the root unit (everything else: neck, heads, embeddings). Both save one full state
dict on rank 0, which loads on a single device. Both can checkpoint activations of chosen layer classes
(``checkpoint_layers``) in addition to the model's own (``model.encoder_checkpoint_layers``, the backbones'
``use_checkpoint`` / ``with_cp``); do not name a class the model already checkpoints, or it is recomputed twice.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint


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


def apply_activation_checkpointing(module: nn.Module, layer_classes: tuple[type[nn.Module], ...]) -> list[str]:
    """Runs every ``layer_classes`` instance inside ``module`` under ``torch.utils.checkpoint`` (non-reentrant:
    same numbers, its activations recomputed in backward) while gradients are enabled; returns their names.

    The layer's own ``forward`` is wrapped (not the module replaced), so parameter names and checkpoints keep
    their keys and FSDP2's hooks on the layer still gather its parameters before the recomputation. (torch's
    ``checkpoint_wrapper`` / ``apply_activation_checkpointing``, which FSDP1 uses, instead insert a
    ``_checkpoint_wrapped_module`` level into every parameter name, which the optimiser groups and layer-decay
    ids read.) It patches
    these module instances (a ``copy.deepcopy`` of the model would still call the originals): apply it to the
    model that trains, as :meth:`FullyShardedStrategy.shard` does.
    """
    names = []
    for name, layer in module.named_modules():
        if not isinstance(layer, layer_classes) or getattr(layer, "_codetr_checkpointed", False):
            continue
        forward = layer.forward

        def checkpointed(*args: Any, _forward: Any = forward, **kwargs: Any) -> Any:
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed
        layer._codetr_checkpointed = True
        names.append(name)
    return names


_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name not in _DTYPES:
        raise ValueError(f"FSDP reduce dtype {name!r} is not one of {', '.join(_DTYPES)} (or null)")
    return _DTYPES[name]


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 over every rank (data-parallel mesh of size nodes x devices, no tensor parallelism).

    The LightningModule calls :meth:`shard` from ``configure_model`` (``CoDETRModule`` does). Gradient-norm
    clipping works unchanged (``clip_grad_norm_`` reduces the DTensor shards' norms across ranks).

    Args:
        wrap_layers: import paths of the layer classes that become their own FSDP unit.
        checkpoint_layers: import paths of layer classes run under activation checkpointing
            (:func:`apply_activation_checkpointing`, applied before sharding).
        reshard_after_forward: free gathered parameters after each unit's forward (ZeRO-3; False keeps them until
            backward: more memory, one all-gather less per unit and step).
        reduce_dtype: dtype of the gradient reduce-scatter (FSDP2 ``MixedPrecisionPolicy``), e.g. ``bfloat16`` to
            halve its traffic; None reduces in the parameters' dtype (fp32). For bf16 compute use
            ``trainer.precision=bf16-mixed``: autocast keeps deformable sampling, matching and losses in fp32.
            FSDP2's ``param_dtype`` is not offered: all-bf16 parameters would also run those parts, and the frozen
            BatchNorm (fp32 buffers), in bf16.
        save_distributed_checkpoint: False (default) writes one full checkpoint from rank 0; True one shard per rank.
        kwargs: ``process_group_backend``, ``timeout`` (Lightning's ``ModelParallelStrategy``).
    """

    def __init__(self, wrap_layers: Sequence[str] = (), checkpoint_layers: Sequence[str] = (),
                 reshard_after_forward: bool = True, reduce_dtype: str | None = None,
                 save_distributed_checkpoint: bool = False, **kwargs: Any):
        super().__init__(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.wrap_layers = tuple(import_layer_class(path) for path in wrap_layers)
        self.checkpoint_layers = tuple(import_layer_class(path) for path in checkpoint_layers)
        self.reshard_after_forward = bool(reshard_after_forward)
        self.mp_policy = MixedPrecisionPolicy(reduce_dtype=_dtype(reduce_dtype))

    def setup_environment(self) -> None:
        # pure data parallelism: one mesh dimension over every process (ModelParallelStrategy's "auto" would make
        # the processes of one node a tensor-parallel group)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, module: nn.Module, mesh: DeviceMesh | None = None) -> nn.Module:
        """Applies activation checkpointing to the ``checkpoint_layers`` instances, then ``fully_shard`` to every
        ``wrap_layers`` instance (innermost first) and to ``module`` itself; a module that is already sharded is
        returned unchanged."""
        if isinstance(module, FSDPModule):
            return module
        if self.checkpoint_layers:
            apply_activation_checkpointing(module, self.checkpoint_layers)
        mesh = mesh if mesh is not None else self.device_mesh["data_parallel"]
        options = {"mesh": mesh, "reshard_after_forward": self.reshard_after_forward, "mp_policy": self.mp_policy}
        for layer in reversed(list(module.modules())):
            if layer is not module and isinstance(layer, self.wrap_layers):
                fully_shard(layer, **options)
        fully_shard(module, **options)
        return module


def fsdp_strategy(wrap_layers: Sequence[str] = (), checkpoint_layers: Sequence[str] = (),
                  state_dict_type: str = "full", **kwargs: Any) -> FSDPStrategy:
    """FSDP1: ``FSDPStrategy(auto_wrap_policy={classes}, activation_checkpointing_policy={classes}, ...)``; other
    keyword arguments (``sharding_strategy``, ``cpu_offload``, ...) go to Lightning unchanged."""
    wrap = {import_layer_class(path) for path in wrap_layers}
    checkpoint = {import_layer_class(path) for path in checkpoint_layers}
    return FSDPStrategy(auto_wrap_policy=wrap or None, activation_checkpointing_policy=checkpoint or None,
                        state_dict_type=state_dict_type, **kwargs)
