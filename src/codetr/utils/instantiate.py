"""Hydra instantiation restricted to trusted code: every ``_target_`` in a config must live under one of the
allowed module prefixes (``codetr.``, ``torch.``, ``torchvision.``, ``lightning.``); anything else is refused
before a single object is built, so a config (or a command-line override) cannot call arbitrary functions."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

ALLOWED_PREFIXES: tuple[str, ...] = ("codetr.", "torch.", "torchvision.", "lightning.")


def _walk_targets(node: Any, path: str) -> Iterable[tuple[str, Any]]:
    if isinstance(node, DictConfig):
        for key in node:
            child_path = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield child_path, node._get_node(key)._value()
            else:
                yield from _walk_targets(node._get_node(key), child_path)
    elif isinstance(node, ListConfig):
        for index in range(len(node)):
            yield from _walk_targets(node._get_node(index), f"{path}[{index}]")


def check_targets(cfg: Any, allowed: tuple[str, ...] = ALLOWED_PREFIXES) -> None:
    """Raise ``ValueError`` naming every ``_target_`` outside ``allowed`` (interpolations are resolved first).
    Hydra's own node (``hydra``: launcher, sweeper) is not ours to instantiate and is skipped."""
    if not isinstance(cfg, DictConfig | ListConfig):
        cfg = OmegaConf.create(cfg)
    if isinstance(cfg, DictConfig):
        # child nodes keep their parent, so interpolations into the rest of the config still resolve
        resolved = OmegaConf.create({
            key: OmegaConf.to_container(cfg[key], resolve=True) if isinstance(cfg[key], DictConfig | ListConfig)
            else cfg[key]
            for key in cfg if key != "hydra"
        })
    else:
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    bad = [
        f"{path}={target!r}"
        for path, target in _walk_targets(resolved, "")
        if not isinstance(target, str) or not target.startswith(allowed)
    ]
    if bad:
        raise ValueError(f"refusing to instantiate targets outside {allowed}: {', '.join(bad)}")


def instantiate_checked(cfg: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` after :func:`check_targets`."""
    check_targets(cfg)
    return hydra.utils.instantiate(cfg, *args, **kwargs)
