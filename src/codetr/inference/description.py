"""What a checkpoint must carry to rebuild its detector without Hydra: :class:`ModelDescription`.

Training writes it into every Lightning checkpoint (``checkpoint["codetr_model"]``, via
:class:`codetr.lightning.CoDETRModule`); ``python -m codetr.convert --recipe`` writes it into converted official
checkpoints. It holds plain values only (read with ``torch.load(weights_only=True)``):

* ``detector``: the resolved ``model.detector`` config node (``_target_`` tree, rebuilt with the same guarded
  instantiation as the entry points; pretrained-backbone downloads are switched off: the checkpoint has the weights);
* ``test_transform``: the ``aug`` node whose test pipeline (:func:`codetr.data.transforms.build_pipeline`) resizes
  images as evaluation does, and ``size_divisor`` of the batch padding;
* ``pixel_mean`` / ``pixel_std`` (RGB, 0-255 scale), ``class_names`` (or None: class indices are shown) and
  ``category_ids`` (label -> dataset category id, for COCO result files).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

CHECKPOINT_KEY = "codetr_model"
FORMAT_VERSION = 1


class MissingDescriptionError(ValueError):
    """A checkpoint without the model description (written before codetr stored one, or a bare state dict)."""


@dataclass
class ModelDescription:
    detector: dict[str, Any]
    test_transform: dict[str, Any]
    pixel_mean: list[float]
    pixel_std: list[float]
    class_names: list[str] | None = None
    category_ids: list[int] | None = None
    recipe: str | None = None
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return int(self.detector["query_head"]["num_classes"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "checkpoint") -> ModelDescription:
        missing = [k for k in ("detector", "test_transform", "pixel_mean", "pixel_std") if k not in data]
        if missing:
            raise MissingDescriptionError(f"{source}: the model description lacks {', '.join(missing)}")
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def detector_config(self) -> dict[str, Any]:
        """The detector node, with any pretrained-backbone download switched off (the checkpoint has weights)."""
        config = _plain(self.detector)
        backbone = config.get("backbone")
        if isinstance(backbone, dict) and "weights" in backbone:
            backbone["weights"] = None
        return config


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, list | tuple):
        return [_plain(v) for v in node]
    return node


def describe(cfg: Any, class_names: Sequence[str] | None = None, category_ids: Sequence[int] | None = None,
             recipe: str | None = None) -> ModelDescription:
    """The description of the model a composed codetr config (``train`` / ``evaluate`` / ``predict``) builds."""
    from omegaconf import OmegaConf

    def container(node: Any) -> Any:
        return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else _plain(node)

    aug = container(cfg.aug)
    return ModelDescription(
        detector=container(cfg.model.detector),
        test_transform=aug,
        pixel_mean=[float(v) for v in cfg.data.pixel_mean],
        pixel_std=[float(v) for v in cfg.data.pixel_std],
        class_names=[str(n) for n in class_names] if class_names else None,
        category_ids=[int(i) for i in category_ids] if category_ids else None,
        recipe=recipe,
    )


def compose_recipe(recipe: str, overrides: Sequence[str] = ()) -> Any:
    """``evaluate`` config of ``experiment=<recipe>`` (+ overrides), composed from the packaged configs."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import codetr.utils  # noqa: F401  (registers the resolvers)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("codetr.conf", version_base="1.3"):
            return compose("evaluate", overrides=[f"experiment={recipe}", "ckpt_path=unused", *overrides])
    finally:
        GlobalHydra.instance().clear()


def describe_recipe(recipe: str, overrides: Sequence[str] = (), class_names: Sequence[str] | None = None,
                    num_classes: int | None = None) -> ModelDescription:
    """Description of a packaged recipe (``conf/experiment/<recipe>.yaml``); ``num_classes`` overrides K."""
    extra = [f"data.num_classes={num_classes}"] if num_classes is not None else []
    if class_names and num_classes is None:
        extra = [f"data.num_classes={len(class_names)}"]
    return describe(compose_recipe(recipe, [*extra, *overrides]), class_names, recipe=recipe)


def read_description(checkpoint: Mapping[str, Any], path: str | Path) -> ModelDescription:
    """The description stored in a loaded checkpoint dict; a clear error naming ``path`` when there is none."""
    data = checkpoint.get(CHECKPOINT_KEY)
    if not isinstance(data, Mapping):
        raise MissingDescriptionError(
            f"{path} does not describe its model (no '{CHECKPOINT_KEY}' entry: it was written before codetr stored "
            f"one, or it is a bare state dict). Name the recipe it was trained with: "
            f"Detector.from_checkpoint(path, recipe='<experiment>', overrides=[...]) in Python, or add the "
            f"description to the file for good: python -m codetr.convert {path} <new.ckpt> --recipe <experiment> "
            f"[--override key=value ...] [--class-names names.txt]"
        )
    return ModelDescription.from_dict(data, str(path))
