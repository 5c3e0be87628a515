"""OmegaConf resolvers used by ``conf/`` (registered once, idempotently, when ``codetr.utils`` is imported).

``${codetr.milestones:<max_epochs>,<table>}`` -- the learning-rate step epochs for a schedule length.
    Rule: if ``max_epochs`` is a key of ``table`` (``scheduler.milestone_table``, reference values
    ``{12: [11], 24: [20], 36: [30]}``; the Objects365 -> COCO recipe uses ``{16: [8]}``), its list is used;
    otherwise one step at ``round(max_epochs * 11 / 12)`` (the 1x proportion), at least epoch 1. So
    ``trainer.max_epochs=36`` alone moves the step of a 1x recipe to 30.
``${codetr.lookup:<table>,<key1>,<key2>,...}`` -- nested table lookup with an optional ``default`` entry at each
    level, e.g. the Swin-L drop-path rate per (augmentation, epochs).
``${codetr.mul:<a>,<b>}`` / ``${codetr.div:<a>,<b>}`` -- product / quotient (integer division when both are
    integers), for values derived from another, e.g. an auxiliary loss weight from the base one or the positional
    encoding's width from ``model.embed_dims``.
``${codetr.stage_widths:<base>,<stages>}`` -- ``[base * 2**s for s in stages]``: the channels of the chosen stages of
    a backbone whose width doubles per stage (Swin: ``base`` = ``embed_dims``), so a neck's ``in_channels`` follow
    the backbone's ``out_indices`` (Co-DINO: stages 0-3; Co-Deformable-DETR Swin recipes: 1-3).
``${codetr.present:<node>}`` -- whether a config node is set (not null), e.g. masks in the data when the detector has
    a mask branch.
``${codetr.first:<list>}`` -- its first element (the mask RoI size = the first mask stage's size).
``${codetr.stage_classes:<K>,<stage_sizes>}`` -- ``[K, ..., K, 1]``, one entry per mask stage: per-class stages with
    a class-agnostic last one, as every Co-DINO-Inst config.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _get(table: Mapping, key: Any) -> Any:
    for candidate in (key, str(key)):
        if candidate in table:
            return table[candidate]
    if isinstance(key, str) and key.lstrip("-").isdigit() and int(key) in table:
        return table[int(key)]
    if "default" in table:
        return table["default"]
    raise KeyError(f"{key!r} is not in the lookup table (keys: {sorted(map(str, table))}) and it has no 'default'")


def milestones_for(max_epochs: int, table: Mapping | None = None) -> list[int]:
    """Epochs at which the learning rate is multiplied by ``gamma`` for a schedule of ``max_epochs`` epochs."""
    max_epochs = int(max_epochs)
    table = _plain(table) or {}
    try:
        return [int(epoch) for epoch in _get({k: v for k, v in table.items() if k != "default"}, max_epochs)]
    except KeyError:
        return [max(1, round(max_epochs * 11 / 12))]


def lookup(table: Mapping, *keys: Any) -> Any:
    """``table[k1][k2]...`` where a level without the key falls back to its ``default`` entry."""
    value: Any = _plain(table)
    for key in keys:
        value = _get(value, key)
    return value


def mul(a: Any, b: Any) -> Any:
    return a * b


def div(a: Any, b: Any) -> Any:
    if isinstance(a, int) and isinstance(b, int):
        if a % b:
            raise ValueError(f"codetr.div: {a} is not divisible by {b}")
        return a // b
    return a / b


def stage_widths(base: Any, stages: Any) -> list[int]:
    """Channels ``base * 2**s`` of each backbone stage ``s`` in ``stages``."""
    return [int(base) * 2 ** int(s) for s in _plain(stages)]


def positive_query_branches(roi_heads: Any, bbox_heads: Any, use_positive_queries: Any) -> int:
    """``num_co_heads`` of the configured auxiliary heads (see :mod:`codetr.models.part_agreement`)."""
    from codetr.models.part_agreement import positive_query_branches as count

    return count(len(roi_heads or []), len(bbox_heads or []), bool(use_positive_queries))


def sweep_group(mode: Any, sweep_dir: str) -> str:
    """W&B group of a job: the multirun directory's name for every job of one sweep (``-m``), "" for a single run."""
    return Path(str(sweep_dir)).name if str(mode).endswith("MULTIRUN") else ""


def run_name(task_name: str, mode: Any, job_num: Any) -> str:
    """W&B run name: ``<task>`` for a single run, ``<task>-<job number>`` inside a sweep."""
    return f"{task_name}-{job_num}" if str(mode).endswith("MULTIRUN") else str(task_name)


def _as_config(function):
    """Resolver results must be primitives or OmegaConf containers (``OmegaConf.resolve`` rejects lists)."""

    def wrapped(*args: Any) -> Any:
        value = function(*args)
        return OmegaConf.create(value) if isinstance(value, list | dict) else value

    return wrapped


def present(node: Any) -> bool:
    return node is not None


def first(values: Any) -> Any:
    return _plain(values)[0]


def stage_classes(num_classes: Any, stage_sizes: Any) -> list[int]:
    return [int(num_classes)] * (len(_plain(stage_sizes)) - 1) + [1]


def register_resolvers() -> None:
    """Register the ``codetr.*`` resolvers (safe to call repeatedly)."""
    for name, function in (("codetr.milestones", milestones_for), ("codetr.lookup", lookup),
                           ("codetr.sweep_group", sweep_group), ("codetr.run_name", run_name),
                           ("codetr.mul", mul), ("codetr.div", div), ("codetr.stage_widths", stage_widths),
                           ("codetr.positive_query_branches", positive_query_branches), ("codetr.first", first),
                           ("codetr.present", present),
                           ("codetr.stage_classes", stage_classes)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, _as_config(function))


register_resolvers()
