"""Published Co-DETR checkpoints by name, for :meth:`codetr.inference.Detector.from_pretrained`.

The original authors publish the ViT-L models on the Hugging Face Hub (``zongzhuofan/*``, one ``pytorch_model.pth``
each, original-repository key names). ``from_pretrained`` accepts such a hub id (the recipe is then known), an
``hf://<owner>/<repo>/<file>`` source or a local file (give ``recipe=``), finds the file in the local caches first
(``paths.weights_dir`` / ``$TORCH_HOME/hub/checkpoints`` / the Hugging Face cache, as the pretrained backbones:
:func:`codetr.models.backbones.pretrained.resolve_weights`), downloads it when online, converts it once with
:mod:`codetr.convert` and keeps the converted checkpoint (with its model description) under
``$CODETR_CACHE/converted/`` (default ``~/.cache/codetr``); later calls load that file directly.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

# hub id -> (codetr recipe, file in the repository)
OFFICIAL_MODELS: dict[str, tuple[str, str]] = {
    "zongzhuofan/co-detr-vit-large-coco": ("co_dino_vit_l_coco", "pytorch_model.pth"),
    "zongzhuofan/co-detr-vit-large-coco-instance": ("co_dino_inst_vit_l_coco", "pytorch_model.pth"),
    "zongzhuofan/co-detr-vit-large-lvis": ("co_dino_vit_l_lvis", "pytorch_model.pth"),
    "zongzhuofan/co-detr-vit-large-lvis-instance": ("co_dino_inst_vit_l_lvis", "pytorch_model.pth"),
}


@dataclass
class PretrainedModel:
    """Where a published model comes from and the recipe that describes it."""

    source: str  # hf://owner/repo/file or a local path
    recipe: str | None


def lookup(name: str | Path, recipe: str | None = None) -> PretrainedModel:
    """``name``: a known hub id, ``hf://owner/repo/file``, or a local file; ``recipe`` overrides the known one."""
    text = str(name)
    if text in OFFICIAL_MODELS:
        known, filename = OFFICIAL_MODELS[text]
        return PretrainedModel(f"hf://{text}/{filename}", recipe or known)
    if text.startswith("hf://") or Path(text).exists():
        return PretrainedModel(text, recipe)
    known = ", ".join(sorted(OFFICIAL_MODELS))
    raise FileNotFoundError(f"{text} is neither a local file, an hf://<owner>/<repo>/<file> source nor a known model "
                            f"({known})")


def local_folder(source: str, weights_dir: str | Path | None) -> Path | None:
    """The folder of ``weights_dir`` searched for ``source``: ``<weights_dir>/<repository name>`` for hub sources
    (their files share one name), ``weights_dir`` itself otherwise."""
    if weights_dir is None or not source.startswith("hf://"):
        return Path(weights_dir) if weights_dir is not None else None
    return Path(weights_dir) / source[len("hf://"):].split("/")[1]


def cache_dir() -> Path:
    return Path(os.environ.get("CODETR_CACHE", Path.home() / ".cache" / "codetr"))


def converted_path(source_file: Path, recipe: str, overrides: tuple[str, ...], root: Path | None = None) -> Path:
    """Where the converted checkpoint of ``source_file`` for ``recipe`` (+ overrides) is kept: named after the file
    and a digest of its path, size and modification time, the recipe and the overrides."""
    stat = source_file.stat()
    key = f"{source_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{recipe}|{'|'.join(overrides)}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return (root or cache_dir()) / "converted" / f"{source_file.stem}-{recipe}-{digest}.ckpt"
