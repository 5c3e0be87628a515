"""Config nodes that are handed to the code as plain mappings (``optimizer``, ``scheduler``, ``aug``,
``nonfinite``, ``model.compile``) are read key by key, so a misspelt or invented key (``+optimizer.learning_rate=``)
would be accepted and ignored. :func:`check_known_keys` refuses it, naming the valid keys."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


def check_known_keys(node: Mapping[str, Any], valid: Iterable[str], where: str) -> None:
    """Raise ``ValueError`` when ``node`` has keys outside ``valid``; ``where`` is the node's config path."""
    valid = set(valid)
    unknown = sorted(str(key) for key in node if key not in valid)
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(f'{where}.{key}' for key in unknown)}: nothing reads "
                         f"them; the keys of {where} are {', '.join(sorted(valid))}")
