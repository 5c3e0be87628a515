"""Pretrained backbone sources: which file a ``weights`` value names, where it is looked for, and how it is read.

A backbone's ``weights`` (config key ``model.detector.backbone.weights``) is one of

* ``None``: random initialisation (training from scratch);
* a local file: ``/data/weights/resnet50-0676ba61.pth`` (``torch.load(weights_only=True)`` or ``.safetensors``);
* ``torchvision://<arch>``: torchvision's ImageNet-1k weights, ``IMAGENET1K_V1`` (the file mmdet's
  ``torchvision://resnet50`` loads), e.g. ``torchvision://resnet50`` -> ``resnet50-0676ba61.pth``;
* ``https://.../<file>``: a released file (e.g. the official Swin checkpoints), downloaded with ``torch.hub``;
* ``hf://<owner>/<repo>/<path in the repo>``: a file of a Hugging Face hub repository (e.g. EVA-02's own files);
* ``timm://<model>.<tag>``: timm's weights on the Hugging Face hub (repository ``timm/<model>.<tag>``,
  ``model.safetensors``; kept locally as ``<model>.<tag>.safetensors``).

A named source is resolved without touching the network first; the first hit wins:

1. ``<weights_dir>/<file name>`` (``paths.weights_dir``, env ``CODETR_WEIGHTS_DIR``; the training entry point
   passes it, a backbone built directly has none);
2. ``$TORCH_HOME/hub/checkpoints/<file name>`` (torch.hub's cache, shared with torchvision and mmdet);
3. the Hugging Face cache (``$HF_HOME/hub``) for ``hf://`` and ``timm://`` sources;
4. a download (torch.hub into 2., huggingface_hub into 3.) when the host answers within a few seconds and
   ``HF_HUB_OFFLINE`` is not set for a hub source.

Otherwise :class:`PretrainedWeightsUnavailable` names the file, where to put it, where to download it from and
the config key that takes a local file instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor

from codetr.checkpoint_io import load_weights_file, require_online, unwrap_state_dict

WEIGHTS_KEY = "model.detector.backbone.weights"
HF_ENDPOINT = "https://huggingface.co"


class PretrainedWeightsUnavailable(FileNotFoundError):
    """A named pretrained source is neither cached locally nor downloadable (offline machine)."""


@dataclass(frozen=True)
class PretrainedSource:
    """A named remote file: ``filename`` is its name in the local caches; ``url`` (torch.hub download) or
    ``hf_repo`` / ``hf_file`` (Hugging Face hub download) say where it comes from."""

    spec: str
    filename: str
    url: str | None = None
    hf_repo: str | None = None
    hf_file: str | None = None

    @property
    def download_url(self) -> str:
        return self.url or f"{HF_ENDPOINT}/{self.hf_repo}/resolve/main/{self.hf_file}"


def parse_source(spec: str | Path) -> PretrainedSource | None:
    """The named source of ``spec``, or None when ``spec`` is a local path (no ``scheme://``)."""
    text = str(spec)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return None
    if scheme == "torchvision":
        from torchvision.models import get_model_weights

        try:
            url = get_model_weights(rest).IMAGENET1K_V1.url
        except (ValueError, AttributeError) as error:
            raise ValueError(f"{WEIGHTS_KEY}={text}: torchvision has no ImageNet-1k V1 weights for {rest!r}") from error
        return PretrainedSource(text, Path(urlparse(url).path).name, url=url)
    if scheme in ("http", "https"):
        return PretrainedSource(text, Path(urlparse(text).path).name, url=text)
    if scheme == "hf":
        owner, repo, path = (rest.split("/", 2) + ["", ""])[:3]
        if not (owner and repo and path):
            raise ValueError(f"{WEIGHTS_KEY}={text}: expected hf://<owner>/<repo>/<path of the file in the repo>")
        return PretrainedSource(text, Path(path).name, hf_repo=f"{owner}/{repo}", hf_file=path)
    if scheme == "timm":
        if not rest or "/" in rest:
            raise ValueError(f"{WEIGHTS_KEY}={text}: expected timm://<model>.<pretrained tag>, "
                             f"e.g. timm://swin_tiny_patch4_window7_224.ms_in1k")
        return PretrainedSource(text, f"{rest}.safetensors", hf_repo=f"timm/{rest}", hf_file="model.safetensors")
    raise ValueError(f"{WEIGHTS_KEY}={text}: unknown source scheme {scheme!r} (torchvision://, timm://, hf://, "
                     f"https://, or a local file)")


def cached_locations(source: PretrainedSource, weights_dir: str | Path | None) -> list[Path]:
    """Local places searched for ``source`` (the Hugging Face cache aside), in order."""
    places = [Path(weights_dir) / source.filename] if weights_dir else []
    return [*places, Path(torch.hub.get_dir()) / "checkpoints" / source.filename]


def _hf_cached(source: PretrainedSource) -> Path | None:
    if source.hf_repo is None:
        return None
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.hf_repo, source.hf_file)
    return Path(found) if isinstance(found, str) else None


def _download(source: PretrainedSource) -> Path:
    if source.url is not None:
        require_online(source.url)
        target = Path(torch.hub.get_dir()) / "checkpoints" / source.filename
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(source.url, str(target), progress=True)
        return target
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        raise RuntimeError("HF_HUB_OFFLINE is set")
    require_online(HF_ENDPOINT)
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(source.hf_repo, source.hf_file))


def resolve_weights(spec: str | Path, weights_dir: str | Path | None = None) -> Path:
    """Local file for ``spec`` (module docstring: caches first, then a download).

    Raises:
        FileNotFoundError: a local path that does not exist.
        PretrainedWeightsUnavailable: a named source neither cached nor downloadable; the message names the file,
            the folders to put it in, its download address and ``model.detector.backbone.weights``.
    """
    source = parse_source(spec)
    if source is None:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{WEIGHTS_KEY}: weights file not found: {path} (a local file, or a source: "
                                    f"torchvision://<arch>, timm://<model>.<tag>, hf://<owner>/<repo>/<file>, "
                                    f"https://...; null trains from scratch)")
        return path
    places = cached_locations(source, weights_dir)
    for place in places:
        if place.is_file():
            return place
    cached = _hf_cached(source)
    if cached is not None:
        return cached
    try:
        return _download(source)
    except Exception as error:  # offline, proxy, HTTP error: all end in the same instructions
        labels = (["paths.weights_dir"] if weights_dir else []) + ["$TORCH_HOME/hub/checkpoints"]
        homes = [f"{os.path.abspath(place)} ({label})" for place, label in zip(places, labels)]
        searched = [os.path.abspath(p.parent) for p in places]
        searched += ["the Hugging Face cache"] if source.hf_repo is not None else []
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise PretrainedWeightsUnavailable(
            f"pretrained backbone weights {source.spec} are not available: {source.filename} was not found in "
            f"{', '.join(searched)}, and the download failed ({reason}). Download "
            f"{source.download_url} on a machine with network and put it at {' or '.join(homes)}, or pass a local "
            f"copy with {WEIGHTS_KEY}=/path/to/{source.filename} ({WEIGHTS_KEY}=null trains the backbone from scratch)."
        ) from error


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Tensor dict of a weights file: ``.safetensors`` or a torch file read with ``weights_only=True``; containers
    (``state_dict`` / ``model`` / ``module``) and a ``module.`` prefix are unwrapped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return dict(load_file(str(path), device="cpu"))
    return unwrap_state_dict(load_weights_file(path))


def load_pretrained(spec: str | Path, weights_dir: str | Path | None = None) -> tuple[dict[str, Tensor], str]:
    """``(state dict in the source's own key naming, description of where it came from)``."""
    path = resolve_weights(spec, weights_dir)
    where = str(path) if parse_source(spec) is None else f"{spec} ({path})"
    return read_state_dict(path), where


__all__ = ["PretrainedSource", "PretrainedWeightsUnavailable", "load_pretrained", "parse_source", "read_state_dict",
           "resolve_weights"]
