"""Annotation files are checked once, before training: schema errors name the file, the entry and the field;
orphaned annotations, too many boxes, a class count that differs from data.num_classes and ids that would corrupt
COCO evaluation are caught before they cost a run (files generated here, a few KB)."""

import copy
import gzip
import json
import logging

import pytest
import torch
from PIL import Image

from codetr.data import CocoDataModule, CocoDetection, read_coco_json
from codetr.evaluation import CocoEvaluator

GOOD = {
    "images": [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
               {"id": 2, "file_name": "b.png", "width": 64, "height": 48}],
    "annotations": [{"id": 10, "image_id": 1, "category_id": 5, "bbox": [4, 4, 20, 20], "area": 400, "iscrowd": 0},
                    {"id": 11, "image_id": 2, "category_id": 9, "bbox": [8, 8, 10, 10], "area": 100, "iscrowd": 0}],
    "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}],
}


def write(tmp_path, data, name="ann.json"):
    for image in ("a.png", "b.png"):
        if not (tmp_path / image).exists():
            Image.new("RGB", (64, 48), (90, 120, 30)).save(tmp_path / image)
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def broken(change):
    data = copy.deepcopy(GOOD)
    change(data)
    return data


CASES = {
    "string image id": (lambda d: d["images"][1].update(id="2"), r"images\[1\] \(id '2'\): 'id' must be an integer"),
    "null width": (lambda d: d["images"][0].update(width=None), r"images\[0\] \(id 1\): 'width' must be a positive"),
    "string height": (lambda d: d["images"][0].update(height="48"), r"'height' must be a positive number, got str"),
    "images is an object": (lambda d: d.update(images={"1": {}}), r"'images': must be a list of objects, got dict"),
    "null image entry": (lambda d: d["images"].append(None), r"images\[2\]: is null, not an object"),
    "null annotation entry": (lambda d: d["annotations"].insert(0, None), r"annotations\[0\]: is null"),
    "no file name": (lambda d: d["images"][0].pop("file_name"), r"images\[0\] \(id 1\): has neither a 'file_name'"),
    "iscrowd string": (lambda d: d["annotations"][0].update(iscrowd="0"),
                       r"annotations\[0\] \(id 10\): 'iscrowd' must be 0 or 1, got str '0'"),
    "category id string": (lambda d: d["annotations"][1].update(category_id="9"),
                           r"annotations\[1\] \(id 11\): 'category_id' must be an integer"),
    "bbox strings": (lambda d: d["annotations"][0].update(bbox=["4", "4", "20", "20"]), r"'bbox' must be \[x, y, "),
    "area string": (lambda d: d["annotations"][0].update(area="400"), r"'area' must be a number"),
    "duplicate category id": (lambda d: d["categories"].append({"id": 5, "name": "again"}),
                              r"categories\[2\] \(id 5\): the same id as categories\[0\]"),
    "all annotations orphaned": (lambda d: [a.update(image_id=a["image_id"] + 100) for a in d["annotations"]],
                                 r"none of the 2 annotations has an image_id that matches an image"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_schema_problems_stop_before_training_naming_entry_and_field(tmp_path, case):
    change, message = CASES[case]
    path = write(tmp_path, broken(change))
    with pytest.raises(ValueError, match=message) as raised:
        CocoDetection(tmp_path, path)
    assert str(path) in str(raised.value)


def test_many_problems_are_listed_then_counted(tmp_path):
    data = broken(lambda d: d["images"].extend({"id": str(i), "file_name": "a.png", "width": 1, "height": 1}
                                               for i in range(30)))
    with pytest.raises(ValueError, match=r"30 problem\(s\)[\s\S]*and 10 more"):
        read_coco_json(write(tmp_path, data))


def test_a_gzipped_json_is_read(tmp_path):
    write(tmp_path, GOOD)
    with gzip.open(tmp_path / "ann.json.gz", "wt") as handle:
        json.dump(GOOD, handle)
    ds = CocoDetection(tmp_path, tmp_path / "ann.json.gz")
    assert len(ds) == 2 and ds[0]["labels"].tolist() == [0]
    evaluator = CocoEvaluator(tmp_path / "ann.json.gz", ds.category_ids)
    evaluator.update([1], [{"boxes": ds[0]["boxes"].as_subclass(torch.Tensor), "scores": torch.ones(1),
                            "labels": ds[0]["labels"]}])
    assert evaluator.compute()["AP"] > 0.99


def test_orphaned_annotations_are_dropped_counted_and_reported(tmp_path, caplog):
    data = broken(lambda d: d["annotations"].append({"id": 12, "image_id": 77, "category_id": 5,
                                                     "bbox": [1, 1, 5, 5], "iscrowd": 0}))
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(tmp_path, write(tmp_path, data))
    assert ds.stats["annotations whose image_id matches no image dropped"] == 1
    assert "image_id matches no image" in caplog.text and ds.num_boxes == 2


def test_duplicate_annotation_ids_are_an_error_in_an_evaluation_file_only(tmp_path):
    data = broken(lambda d: d["annotations"][1].update(id=10))
    path = write(tmp_path, data)
    assert CocoDetection(tmp_path, path).stats["annotations sharing an id with another (kept: training does not "
                                                "use ids)"] == 1
    with pytest.raises(ValueError, match=r"annotations\[1\] \(id 10\): the same id as annotations\[0\]"):
        CocoDetection(tmp_path, path, for_evaluation=True)
    with pytest.raises(ValueError, match="annotation ids repeat"):  # the evaluator refuses it on its own as well
        CocoEvaluator(path).compute()


def datamodule(tmp_path, num_classes, val=None, **kwargs):
    train = write(tmp_path, GOOD, "train.json")
    val = write(tmp_path, val or GOOD, "val.json")
    return CocoDataModule(str(tmp_path), str(train), str(tmp_path), str(val), aug={"name": "detr"},
                          num_classes=num_classes, num_workers=0, **kwargs)


def test_a_class_count_other_than_data_num_classes_stops_setup_naming_both_numbers_and_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"train.json has 2 categories but data.num_classes=3"):
        datamodule(tmp_path, 3).setup("fit")
    datamodule(tmp_path, 2).setup("fit")  # matching count: fine


def test_validation_categories_that_differ_from_training_are_an_error(tmp_path):
    val = broken(lambda d: (d["categories"][1].update(id=7), d["annotations"][1].update(category_id=7)))
    with pytest.raises(ValueError, match=r"val categories \(.*val.json: ids \[5, 7\]\) differ from train"):
        datamodule(tmp_path, 2, val=val).setup("fit")


def test_a_training_file_without_usable_boxes_is_an_error(tmp_path):
    train = write(tmp_path, broken(lambda d: [a.update(iscrowd=1) for a in d["annotations"]]), "train.json")
    dm = CocoDataModule(str(tmp_path), str(train), aug={"name": "detr"}, num_workers=0)
    with pytest.raises(ValueError, match=r"no usable training boxes in 2 images \(2 crowd annotations"):
        dm.setup("fit")


def test_an_image_with_too_many_boxes_is_dropped_before_training_with_a_warning(tmp_path, caplog):
    crowded = [{"id": 100 + i, "image_id": 2, "category_id": 5, "bbox": [i % 60, i % 40, 3, 3], "iscrowd": 0}
               for i in range(2000)]
    train = write(tmp_path, broken(lambda d: d["annotations"].extend(crowded)), "train.json")
    dm = CocoDataModule(str(tmp_path), str(train), aug={"name": "detr"}, num_workers=0, max_boxes_per_image=1000)
    with caplog.at_level(logging.WARNING):
        dm.setup("fit")
    ds = dm.datasets["train"]
    assert [image["id"] for image in ds.images] == [1]
    assert ds.stats["images with more than 1000 boxes dropped"] == 1
    assert "b.png (2001 boxes)" in caplog.text
