"""Prediction entry point: ``python -m codetr.predict ckpt_path=<ckpt> input=<image|video|folder> [experiment=...]``.

Runs the main head (:class:`codetr.inference.Detector`: the checkpoint's own model description, else the config's)
over an image, a video or a folder (recursively; streamed with a progress bar) and writes under ``output_dir``,
keeping every input's relative path and full name so that no two inputs share an output:

* ``detections.json``: per image (per frame for videos: ``frame``) ``file``, ``image_size``, boxes xyxy in original
  pixels, scores, labels, names, for the detections at or above ``score_threshold`` (``json_all_detections``: all);
  instance-segmentation models add ``masks`` (COCO compressed RLE at the original size) and ``mask_scores``;
* with ``save_images``: ``<relative path>.png`` per image and ``<relative path>.mp4`` per video, boxes and labels
  drawn at a size that follows the image, masks as a translucent fill with an outline in the class colour;
* ``skipped.json``: every input that was not processed, with the reason (unreadable, empty, not an image...).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.progress import Progress
from torch import Tensor

from codetr.inference.config import detector_from_config
from codetr.inference.detector import Detections, Detector
from codetr.inference.sources import (
    Entry,
    Skipped,
    VideoWriter,
    collect,
    read_image,
    video_frames,
    video_rate,
)
from codetr.utils import check_targets
from codetr.visualize import draw_detections, save_png

log = logging.getLogger(__name__)


def floor(cfg: DictConfig) -> float:
    """The lowest score anything is written or drawn for: below it no mask is pasted."""
    return 0.0 if cfg.json_all_detections else float(cfg.score_threshold)


def record(entry: Entry, found: Detections, cfg: DictConfig, frame: int | None = None) -> dict[str, Any]:
    kept = found if cfg.json_all_detections else found.above(cfg.score_threshold)
    out = {"file": str(entry.relative), **({"frame": frame} if frame is not None else {}), **kept.to_dict()}
    return out


def drawn(image: Tensor, found: Detections, detector: Detector, cfg: DictConfig) -> Tensor:
    return draw_detections(image, found.boxes, found.labels, found.scores, detector.class_names, cfg.score_threshold,
                           masks=found.masks)


def run_images(entries: list[Entry], detector: Detector, cfg: DictConfig, progress: Progress,
               records: list, skipped: list[Skipped]) -> None:
    task = progress.add_task("images", total=len(entries))
    out_dir = Path(cfg.output_dir)
    for start in range(0, len(entries), cfg.batch_size):
        loaded = [(entry, read_image(entry)) for entry in entries[start:start + cfg.batch_size]]
        skipped.extend(image for _, image in loaded if isinstance(image, Skipped))
        good = [(entry, image) for entry, image in loaded if isinstance(image, Tensor)]
        if good:
            results = detector.predict([image for _, image in good], score_threshold=floor(cfg),
                                       batch_size=len(good), precision=cfg.precision)
            for (entry, image), found in zip(good, results):
                records.append(record(entry, found, cfg))
                if cfg.save_images:
                    save_png(drawn(image, found, detector, cfg), out_dir / f"{entry.relative}.png")
        progress.advance(task, len(loaded))


def run_video(entry: Entry, detector: Detector, cfg: DictConfig, progress: Progress, records: list) -> Skipped | None:
    import av

    task = progress.add_task(str(entry.relative), total=None)
    writer = VideoWriter(Path(cfg.output_dir) / f"{entry.relative}.mp4", video_rate(entry.path)) \
        if cfg.save_images else None
    frame_index, batch = 0, []

    def flush() -> None:
        nonlocal frame_index
        for image, found in zip(batch, detector.predict(batch, score_threshold=floor(cfg), batch_size=len(batch),
                                                        precision=cfg.precision)):
            records.append(record(entry, found, cfg, frame_index))
            if writer is not None:
                writer.write(drawn(image, found, detector, cfg))
            frame_index += 1
        progress.advance(task, len(batch))
        batch.clear()

    try:
        for frame in video_frames(entry.path):
            batch.append(frame)
            if len(batch) == cfg.batch_size:
                flush()
        if batch:
            flush()
    except (av.FFmpegError, OSError, ValueError) as error:
        return Skipped(entry.relative, f"cannot decode the video after {frame_index} frames: {error}")
    finally:
        if writer is not None:
            writer.close()
    return None


def predict(cfg: DictConfig) -> list[dict[str, Any]]:
    check_targets(cfg)
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    entries, skipped = collect(cfg.input)
    detector = detector_from_config(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    with Progress(transient=True) as progress:
        run_images([e for e in entries if e.kind == "image"], detector, cfg, progress, records, skipped)
        for entry in (e for e in entries if e.kind == "video"):
            failure = run_video(entry, detector, cfg, progress, records)
            if failure is not None:
                skipped.append(failure)
    (out_dir / "detections.json").write_text(json.dumps(records))
    (out_dir / "skipped.json").write_text(json.dumps([s.as_dict() for s in skipped], indent=1))
    log.info("%d images / frames -> %s", len(records), out_dir)
    if skipped:
        listing = "\n".join(f"  {s.relative}: {s.reason}" for s in skipped)
        log.warning("%d inputs skipped (listed in %s):\n%s", len(skipped), out_dir / "skipped.json", listing)
    return records


@hydra.main(version_base="1.3", config_path="pkg://codetr.conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
