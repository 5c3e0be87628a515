"""What ``python -m codetr.predict input=...`` reads: one file or a folder (recursively), images and videos.

Nothing unreadable stops a job: every entry is classified first (image, video, or skipped with a reason: a folder
named like an image, a file type that is neither), and an image or video that fails to decode while it is read
is reported the same way (:class:`Skipped`); everything else is processed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from codetr.data.coco import load_rgb

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
# What PIL raises for files that are not (complete) images: unidentified / truncated files, bombs, bad headers.
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)


@dataclass(frozen=True)
class Entry:
    """An input: ``path`` on disk, ``relative`` to the input root (names the outputs), ``kind`` image / video."""

    path: Path
    relative: Path
    kind: str


@dataclass(frozen=True)
class Skipped:
    relative: Path
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"file": str(self.relative), "reason": self.reason}


def classify(path: Path, relative: Path) -> Entry | Skipped | None:
    """An entry, a skip with its reason, or None for what is not an input (a plain sub-folder)."""
    suffix = path.suffix.lower()
    if path.is_dir():
        if suffix in IMAGE_SUFFIXES + VIDEO_SUFFIXES:
            return Skipped(relative, f"a directory named like a {suffix} file")
        return None
    if suffix in IMAGE_SUFFIXES:
        return Entry(path, relative, "image")
    if suffix in VIDEO_SUFFIXES:
        return Entry(path, relative, "video")
    if not path.is_file():
        return Skipped(relative, "not a regular file (broken link, socket or device)")
    return Skipped(relative, f"unsupported file type '{suffix or '(no suffix)'}' (images: "
                             f"{' '.join(IMAGE_SUFFIXES)}; videos: {' '.join(VIDEO_SUFFIXES)})")


def collect(source: str | Path) -> tuple[list[Entry], list[Skipped]]:
    """Every input under ``source`` (sorted by relative path) and what was skipped at once, with reasons."""
    source = Path(source)
    if not source.exists() and not source.is_symlink():
        raise FileNotFoundError(f"input not found: {source}")
    if source.is_dir():
        candidates = [(p, p.relative_to(source)) for p in sorted(source.rglob("*"))]
    else:
        candidates = [(source, Path(source.name))]
    entries, skipped = [], []
    for path, relative in candidates:
        found = classify(path, relative)
        if isinstance(found, Entry):
            entries.append(found)
        elif isinstance(found, Skipped):
            skipped.append(found)
    return entries, skipped


def read_image(entry: Entry) -> Tensor | Skipped:
    """``(3, H, W)`` uint8 RGB, decoded as the datasets decode; a :class:`Skipped` naming the error otherwise."""
    try:
        if entry.path.stat().st_size == 0:
            return Skipped(entry.relative, "empty file (0 bytes)")
        return load_rgb(entry.path)
    except DECODE_ERRORS as error:
        return Skipped(entry.relative, f"cannot decode: {type(error).__name__}: {error}")


def video_frames(path: Path) -> Iterator[Tensor]:
    """Decoded frames of a video file as ``(3, H, W)`` uint8 RGB tensors (PyAV)."""
    import av

    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            yield torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1).contiguous()


def video_rate(path: Path) -> float:
    """Frames per second of a video's first stream (25 when the file does not say)."""
    import av

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 25.0


class VideoWriter:
    """Annotated frames -> an H.264 (or MPEG-4 where x264 is missing) video; sizes rounded down to even pixels."""

    def __init__(self, path: Path, fps: float):
        import av

        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), mode="w")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        self.stream = self.container.add_stream(codec, rate=round(fps) or 25)
        self.stream.pix_fmt = "yuv420p"
        self._sized = False

    def write(self, frame: Tensor) -> None:
        import av

        array = frame.permute(1, 2, 0).cpu().numpy()
        height, width = array.shape[0] // 2 * 2, array.shape[1] // 2 * 2
        if not self._sized:
            self.stream.height, self.stream.width = height, width
            self._sized = True
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array[:height, :width]), format="rgb24")
        for packet in self.stream.encode(video_frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
