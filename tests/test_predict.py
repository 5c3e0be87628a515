"""``python -m codetr.predict`` on a messy folder (tiny Co-DINO, random weights, a checkpoint without names or
model description): outputs keep relative paths and full names, unreadable entries are skipped and listed,
videos come back annotated, the json follows the score threshold, labels scale with the image."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from codetr.inference.description import describe_recipe
from codetr.inference.detector import build_model
from codetr.inference.sources import VideoWriter, video_frames
from codetr.predict import predict
from codetr.visualize import PALETTE, draw_detections, line_and_font_size

SMALL = ["experiment=demo", "aug.test_scale=64", "aug.test_max_size=96", "data.root=/nonexistent"]


def picture(seed: int, size=(60, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bare_checkpoint(tmp_path_factory):
    """A checkpoint with weights only: no class names, no model description (as older codetr files)."""
    torch.manual_seed(0)
    model = build_model(describe_recipe("demo", ["aug.test_scale=64"]))
    path = tmp_path_factory.mktemp("ckpt") / "bare.ckpt"
    torch.save({"state_dict": {f"detector.{k}": v for k, v in model.state_dict().items()}}, path)
    return path


@pytest.fixture()
def messy(tmp_path) -> Path:
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    (root / "b").mkdir()
    Image.fromarray(picture(0)).save(root / "sub" / "a.jpg")
    Image.fromarray(picture(1)).save(root / "sub" / "a.png")  # same stem, another type
    Image.fromarray(picture(2)).save(root / "b" / "a.png")  # same name, another folder
    (root / "x.jpg").mkdir()  # a directory named like an image
    (root / "empty.jpg").write_bytes(b"")
    Image.fromarray(picture(3, (200, 200))).save(root / "cut.jpg")
    (root / "cut.jpg").write_bytes((root / "cut.jpg").read_bytes()[:400])  # truncated JPEG
    Image.fromarray(picture(4)).save(root / "anim.gif")
    (root / "notes.txt").write_text("not an image")
    writer = VideoWriter(root / "clip.mp4", fps=5)
    for seed in range(3):
        writer.write(torch.from_numpy(picture(seed, (64, 96))).permute(2, 0, 1))
    writer.close()
    return root


def test_a_messy_folder_writes_every_readable_input_and_lists_the_rest(compose_cfg, bare_checkpoint, messy):
    cfg = compose_cfg("predict", [*SMALL, f"ckpt_path={bare_checkpoint}", f"input={messy}", "score_threshold=0.02",
                                  "batch_size=2"])
    records = predict(cfg)
    out = Path(cfg.output_dir)
    for name in ("sub/a.jpg.png", "sub/a.png.png", "b/a.png.png", "clip.mp4.mp4"):
        assert (out / name).is_file(), name
    assert len(list(video_frames(out / "clip.mp4.mp4"))) == 3
    written = json.loads((out / "detections.json").read_text())
    assert written == json.loads(json.dumps(records))
    assert sorted((r["file"], r.get("frame")) for r in written) == [
        ("b/a.png", None), ("clip.mp4", 0), ("clip.mp4", 1), ("clip.mp4", 2), ("sub/a.jpg", None),
        ("sub/a.png", None)]
    skipped = {s["file"]: s["reason"] for s in json.loads((out / "skipped.json").read_text())}
    assert set(skipped) == {"x.jpg", "empty.jpg", "cut.jpg", "anim.gif", "notes.txt"}
    assert "directory" in skipped["x.jpg"] and "empty" in skipped["empty.jpg"]
    assert "decode" in skipped["cut.jpg"] and "unsupported file type '.gif'" in skipped["anim.gif"]
    for r in written:  # the threshold applies to the json; names fall back to class indices
        assert all(s >= 0.02 for s in r["scores"]) and set(r["names"]) <= {"0", "1", "2", "3"}


def test_json_keeps_every_detection_when_asked(compose_cfg, bare_checkpoint, tmp_path):
    Image.fromarray(picture(5)).save(tmp_path / "one.png")
    counts = {}
    for keep_all in ("false", "true"):
        cfg = compose_cfg("predict", [*SMALL, f"ckpt_path={bare_checkpoint}", f"input={tmp_path / 'one.png'}",
                                      "score_threshold=0.5", f"json_all_detections={keep_all}", "save_images=false"])
        (record,) = predict(cfg)
        counts[keep_all] = len(record["scores"])
    assert counts["false"] < counts["true"] and counts["true"] > 50


def test_labels_grow_with_the_image_and_sit_on_a_filled_background():
    assert line_and_font_size(480, 640) == (2, 14) and line_and_font_size(3000, 4000)[1] >= 80
    image = torch.zeros(3, 3000, 4000, dtype=torch.uint8)
    drawn = draw_detections(image, torch.tensor([[1000.0, 1000.0, 2000.0, 2000.0]]), torch.tensor([1]),
                            torch.tensor([0.9]), ["square"])
    _, font = line_and_font_size(3000, 4000)
    above = drawn[:, 1000 - font:1000, 1000:1000 + font]  # the label's background above the box's corner
    colour = torch.tensor(PALETTE[1], dtype=torch.uint8)[:, None, None]
    assert (above == colour).all(0).float().mean() > 0.5
