"""What a hostile corpus still broke (held-out findings, round 3), each on a fixture generated here: absurd and
clipped boxes are dropped / counted and named, one file under two image ids is merged (training) or refused
(evaluation), a byte order mark, an empty category list, NFC / NFD file names and counted-only problems get
messages that point at the entries."""

from __future__ import annotations

import copy
import json
import logging
import unicodedata

import pytest
from PIL import Image

from codetr.data import CocoDetection

BASE = {
    "images": [{"id": 1, "file_name": "a.png", "width": 100, "height": 80},
               {"id": 2, "file_name": "b.png", "width": 100, "height": 80}],
    "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
                    {"id": 11, "image_id": 2, "category_id": 1, "bbox": [8, 8, 10, 10], "area": 100, "iscrowd": 0}],
    "categories": [{"id": 1, "name": "thing"}],
}


def corpus(tmp_path, change=None, raw: bytes | None = None):
    for name in ("a.png", "b.png"):
        Image.new("RGB", (100, 80), (90, 120, 30)).save(tmp_path / name)
    data = copy.deepcopy(BASE)
    if change:
        change(data)
    path = tmp_path / "ann.json"
    path.write_bytes(raw if raw is not None else json.dumps(data).encode())
    return path


def add(data, **ann):
    data["annotations"].append({"image_id": 1, "category_id": 1, "iscrowd": 0, **ann})


def test_an_absurd_box_is_dropped_and_named_a_clipped_one_counted_and_named(tmp_path, caplog):
    def change(data):
        add(data, id=20, bbox=[10, 10, 1e30, 1e30])  # 1e30 px: not an annotation of a 100 x 80 image
        add(data, id=21, bbox=[70, 10, 40, 20])  # 10 % past the right edge: clipped, counted, named
        add(data, id=22, bbox=[0, 0, 100.4, 80])  # within the tolerance: clipped silently

    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, corpus(tmp_path, change))
    assert ds.stats["boxes far outside their image dropped (more than a whole image side)"] == 1
    assert ds.stats["boxes reaching outside their image clipped"] == 1
    assert "annotation 20 of a.png" in caplog.text and "annotation 21 of a.png" in caplog.text
    assert "annotation 22" not in caplog.text
    boxes = ds.load(0)["boxes"].tolist()
    assert len(boxes) == 3 and [70.0, 10.0, 100.0, 30.0] in boxes  # 10, 21 (clipped), 22


def test_one_file_under_two_image_ids_trains_once_with_both_ids_annotations(tmp_path, caplog):
    def change(data):
        data["images"].append({"id": 3, "file_name": "a.png", "width": 100, "height": 80})
        data["annotations"].append({"id": 12, "image_id": 3, "category_id": 1, "bbox": [50, 40, 20, 20],
                                    "area": 400, "iscrowd": 0})

    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, corpus(tmp_path, change))
    assert len(ds) == 2
    assert sorted(ds.load(0)["boxes"].tolist()) == [[4.0, 4.0, 24.0, 24.0], [50.0, 40.0, 70.0, 60.0]]
    assert "a.png (ids 1 and 3)" in caplog.text
    with pytest.raises(ValueError, match=r"'a.png' is listed under two image ids, 1 and 3"):
        CocoDetection(tmp_path, corpus(tmp_path, change), for_evaluation=True)


def test_a_json_with_a_utf8_byte_order_mark_is_read(tmp_path):
    raw = b"\xef\xbb\xbf" + json.dumps(BASE).encode()
    assert len(CocoDetection(tmp_path, corpus(tmp_path, raw=raw))) == 2


def test_an_empty_category_list_asks_for_categories_not_for_zero_classes(tmp_path):
    with pytest.raises(ValueError, match=r"'categories': is empty: a detection file needs its classes") as error:
        CocoDetection(tmp_path, corpus(tmp_path, lambda d: d.update(categories=[])))
    assert "num_classes=0" not in str(error.value)


def test_a_composed_file_name_finds_its_decomposed_file(tmp_path):
    composed = unicodedata.normalize("NFC", "café.png")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed

    def change(data):
        data["images"][0]["file_name"] = composed

    path = corpus(tmp_path, change)
    (tmp_path / "a.png").rename(tmp_path / decomposed)
    ds = CocoDetection(tmp_path, path)
    assert ds.load(0)["image"].shape[-2:] == (80, 100)


def test_counted_problems_name_their_first_entries(tmp_path, caplog):
    def change(data):
        data["annotations"].append({"id": 30, "image_id": 1, "category_id": 1, "bbox": None, "iscrowd": 0})
        data["annotations"].append({"id": 11, "image_id": 1, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0})
        data["annotations"].append({"id": 31, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5], "iscrowd": 0})

    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, corpus(tmp_path, change))
    assert ds.stats["annotations with a null bbox dropped"] == 1
    assert "annotations[2] (id 30)" in caplog.text
    assert "annotations[3] (id 11, as annotations[1])" in caplog.text
    assert "annotations[4] (id 31, image_id 99)" in caplog.text
    assert ds.num_boxes == 3


def test_evaluation_warns_about_areas_that_contradict_their_boxes(tmp_path, caplog):
    import torch

    from codetr.evaluation import CocoEvaluator

    def change(data):
        data["annotations"][0]["area"] = 0  # a valid 20 x 20 box
        data["annotations"][1]["area"] = 5000  # larger than its 10 x 10 box

    path = corpus(tmp_path, change)
    evaluator = CocoEvaluator(path)
    evaluator.update([1], [{"boxes": torch.tensor([[4.0, 4.0, 24.0, 24.0]]), "scores": torch.ones(1),
                            "labels": torch.zeros(1, dtype=torch.long)}])
    with caplog.at_level(logging.WARNING):
        metrics = evaluator.compute()
    assert "2 annotation(s) have an 'area' that contradicts their box" in caplog.text
    assert "id 10: area 0 for a 20 x 20 box" in caplog.text and "id 11: area 5000 for a 10 x 10 box" in caplog.text
    assert metrics["APs"] != -1  # the numbers stay the COCO tools' (area 0 counts as small)
