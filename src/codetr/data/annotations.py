"""Reading a COCO-format annotation file (``.json`` or gzipped) and checking its schema once, before training.

:func:`check_coco` raises one ``ValueError`` naming the file and, for each problem (the first
:data:`MAX_LISTED`, then a count), the entry (list, index and id) and the field:

* the top level is not an object; ``images`` / ``annotations`` / ``categories`` are missing or not lists; an entry
  is null or not an object;
* an id that is not an integer (``"12"`` included): images' ``id``, categories' ``id``, annotations' ``image_id`` and
  ``category_id``; an image ``width`` / ``height`` that is not a positive number; an image with neither
  ``file_name`` nor ``coco_url``;
* two categories with one id (they would silently become two classes);
* ``iscrowd`` other than 0 / 1 / true / false (a string ``"0"`` is truthy in Python: it made crowd boxes);
  ``bbox`` not a list of four numbers (nulls allowed: that box is dropped later); ``area`` not a number;
  ``segmentation`` neither a list, an object nor null;
* annotations exist but none of their ``image_id`` matches an image (nothing to train on or to score);
* evaluation files only (``for_evaluation``): an annotation without an integer ``id`` or without a ``bbox``, two
  annotations or two images with one id -- COCO evaluation indexes them by id, so duplicates change AP silently.

What is only counted (returned, reported once by the dataset): annotations whose ``image_id`` matches no image
(dropped), and duplicated annotation ids in a training file (training does not use them).
"""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

REQUIRED_FIELDS = ("images", "annotations", "categories")
MAX_LISTED = 20
NAMED = 5  # entries named for a tolerated (counted) case
GZIP_MAGIC = b"\x1f\x8b"
_MISSING = object()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _describe(value: Any) -> str:
    if value is _MISSING:
        return "nothing (the field is missing)"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"[:80]


class _Problems:
    """Collects problems; :meth:`raise_if_any` raises them as one error."""

    def __init__(self, path: Path):
        self.path, self.listed, self.count = path, [], 0

    def add(self, where: str, message: str) -> None:
        self.count += 1
        if len(self.listed) < MAX_LISTED:
            self.listed.append(f"{where}: {message}")

    def raise_if_any(self) -> None:
        if not self.count:
            return
        more = f"\n  ... and {self.count - len(self.listed)} more" if self.count > len(self.listed) else ""
        raise ValueError(f"{self.path}: {self.count} problem(s) in the annotation file:\n  "
                         + "\n  ".join(self.listed) + more)


def load_json(path: str | Path) -> Any:
    """The parsed file; gzip is recognised by its magic bytes (``.json.gz``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    with path.open("rb") as handle:
        compressed = handle.read(2) == GZIP_MAGIC
    try:
        # utf-8-sig: a UTF-8 byte order mark (what some Windows tools write) is skipped, plain UTF-8 reads as before
        with (gzip.open(path, "rt", encoding="utf-8-sig") if compressed else path.open(encoding="utf-8-sig")) as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError, EOFError, OSError) as error:
        kind = "gzipped JSON" if compressed else "JSON"
        raise ValueError(f"{path} is not valid {kind}: {error}") from error


def _check_top_level(data: Any, problems: _Problems) -> bool:
    path = problems.path
    if not isinstance(data, dict):
        raise ValueError(  # noqa: TRY004 - one error type for every "not COCO" case
            f"{path} is not a COCO annotation file: top level is {type(data).__name__}, not an object")
    for field in REQUIRED_FIELDS:
        if field not in data:
            raise ValueError(f"{path} is not a COCO annotation file: missing field '{field}'")
        if not isinstance(data[field], list):
            problems.add(f"'{field}'", f"must be a list of objects, got {_describe(data[field])}")
    return problems.count == 0


def _entries(data: dict, field: str, problems: _Problems) -> list[tuple[int, dict]]:
    """``(index, entry)`` of the object entries of ``data[field]``; other entries are problems."""
    out = []
    for index, entry in enumerate(data[field]):
        if isinstance(entry, dict):
            out.append((index, entry))
        else:
            problems.add(f"{field}[{index}]", f"is {_describe(entry)}, not an object")
    return out


def _check_images(data: dict, problems: _Problems, for_evaluation: bool) -> set[int]:
    ids: dict[int, int] = {}
    for index, image in _entries(data, "images", problems):
        image_id = image.get("id", _MISSING)
        where = f"images[{index}] (id {image_id!r})" if image_id is not _MISSING else f"images[{index}]"
        if not _is_int(image_id):
            problems.add(where, f"'id' must be an integer, got {_describe(image_id)}")
        elif image_id in ids and for_evaluation:
            problems.add(where, f"the same id as images[{ids[image_id]}] (evaluation needs unique image ids)")
        else:
            ids.setdefault(image_id, index)
        for key in ("width", "height"):
            value = image.get(key, _MISSING)
            if not (_is_number(value) and math.isfinite(value) and value > 0):
                problems.add(where, f"'{key}' must be a positive number, got {_describe(value)}")
        if not isinstance(image.get("file_name"), str) and not isinstance(image.get("coco_url"), str):
            problems.add(where, "has neither a 'file_name' nor a 'coco_url' string")
    return set(ids)


def _check_categories(data: dict, problems: _Problems) -> None:
    if isinstance(data["categories"], list) and not data["categories"]:
        problems.add("'categories'", "is empty: a detection file needs its classes, e.g. [{\"id\": 1, \"name\": "
                                     "\"person\"}, ...] (one entry per class; their ids are what annotations' "
                                     "category_id refer to)")
        return
    ids: dict[int, int] = {}
    for index, category in _entries(data, "categories", problems):
        category_id = category.get("id", _MISSING)
        where = f"categories[{index}]"
        if not _is_int(category_id):
            problems.add(where, f"'id' must be an integer, got {_describe(category_id)}")
        elif category_id in ids:
            problems.add(f"{where} (id {category_id})", f"the same id as categories[{ids[category_id]}] "
                         "(two categories with one id would become two classes)")
        else:
            ids[category_id] = index


def _check_annotation_fields(ann: dict, where: str, problems: _Problems, for_evaluation: bool) -> None:
    for key in ("image_id", "category_id"):
        value = ann.get(key, _MISSING)
        if not _is_int(value):
            problems.add(where, f"'{key}' must be an integer, got {_describe(value)}")
    iscrowd = ann.get("iscrowd", 0)
    if not (_is_number(iscrowd) or isinstance(iscrowd, bool)) or iscrowd not in (0, 1):
        problems.add(where, f"'iscrowd' must be 0 or 1, got {_describe(iscrowd)}")
    box = ann.get("bbox", _MISSING)
    if box is _MISSING or box is None:
        if for_evaluation:
            problems.add(where, "has no 'bbox' (box evaluation needs one)")
    elif not (isinstance(box, list) and len(box) == 4 and all(v is None or _is_number(v) for v in box)):
        problems.add(where, f"'bbox' must be [x, y, width, height] numbers, got {_describe(box)}")
    area = ann.get("area", _MISSING)
    if area is not _MISSING and not _is_number(area):
        problems.add(where, f"'area' must be a number, got {_describe(area)}")
    segmentation = ann.get("segmentation")
    if segmentation is not None and not isinstance(segmentation, list | dict):
        problems.add(where, f"'segmentation' must be polygons (a list) or RLE (an object), got "
                            f"{_describe(segmentation)}")


def _check_annotations(data: dict, problems: _Problems, image_ids: set[int], for_evaluation: bool) -> Notes:
    """Schema problems of the annotations; returns the tolerated cases as counts, each key naming its first
    :data:`NAMED` entries (list index and id) so that a user can find them."""
    notes = Notes()
    ids: dict[Any, int] = {}
    orphans: list[Any] = []
    named: dict[str, list[str]] = {}
    counts: Counter = Counter()

    def note(kind: str, entry: str) -> None:
        counts[kind] += 1
        if len(named.setdefault(kind, [])) < NAMED:
            named[kind].append(entry)

    entries = _entries(data, "annotations", problems)
    for index, ann in entries:
        ann_id = ann.get("id", _MISSING)
        where = f"annotations[{index}] (id {ann_id!r})" if ann_id is not _MISSING else f"annotations[{index}]"
        _check_annotation_fields(ann, where, problems, for_evaluation)
        if for_evaluation and not _is_int(ann_id):
            problems.add(where, f"'id' must be an integer (evaluation needs one), got {_describe(ann_id)}")
        elif ann_id is not _MISSING and ann_id in ids:
            if for_evaluation:
                problems.add(where, f"the same id as annotations[{ids[ann_id]}] (duplicate annotation ids change "
                                    "COCO AP silently)")
            else:
                note("duplicate", f"annotations[{index}] (id {ann_id!r}, as annotations[{ids[ann_id]}])")
        elif ann_id is not _MISSING:
            ids[ann_id] = index
        if "bbox" in ann and ann["bbox"] is None:
            note("null box", where)
        if _is_int(ann.get("image_id")) and ann["image_id"] not in image_ids:
            orphans.append(ann.get("image_id"))
            note("orphan", f"annotations[{index}] (id {ann_id!r}, image_id {ann['image_id']})")
    if orphans and len(orphans) == len(entries) and image_ids:
        problems.add("annotations", f"none of the {len(orphans)} annotations has an image_id that matches an image "
                                    f"(annotation image_ids e.g. {sorted(set(orphans))[:5]}, image ids e.g. "
                                    f"{sorted(image_ids)[:5]})")
    elif orphans:
        notes.add("annotations whose image_id matches no image dropped", counts["orphan"],
                  _listed(named, counts, "orphan"))
    if counts["duplicate"]:
        notes.add("annotations sharing an id with another (kept: training does not use ids)", counts["duplicate"],
                  _listed(named, counts, "duplicate"))
    if counts["null box"]:
        notes.add("annotations with a null bbox dropped", counts["null box"], _listed(named, counts, "null box"))
    return notes


class Notes(Counter):
    """Counts of tolerated problems, with ``examples[kind]`` naming the first entries of each kind."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.examples: dict[str, str] = {}

    def add(self, kind: str, count: int, examples: str = "") -> None:
        self[kind] += count
        if examples:
            self.examples[kind] = examples

    def describe(self) -> str:
        """One line: ``count kind (first entries)`` for every kind, sorted."""
        return "; ".join(f"{n} {kind}" + (f" ({self.examples[kind]})" if kind in self.examples else "")
                         for kind, n in sorted(self.items()))


def _listed(named: dict[str, list[str]], counts: Counter, kind: str) -> str:
    """The first entries of ``kind``, and how many more there are."""
    entries = named.get(kind, [])
    more = counts[kind] - len(entries)
    return ", ".join(entries) + (f" and {more} more" if more > 0 else "")


def check_coco(data: Any, path: str | Path, for_evaluation: bool = False) -> Notes:
    """Check a parsed COCO file (module docstring); returns the counted, tolerated problems."""
    problems = _Problems(Path(path))
    if not _check_top_level(data, problems):
        problems.raise_if_any()
    image_ids = _check_images(data, problems, for_evaluation)
    _check_categories(data, problems)
    notes = _check_annotations(data, problems, image_ids, for_evaluation)
    problems.raise_if_any()
    return notes


def read_coco_json(path: str | Path, for_evaluation: bool = False) -> dict:
    """Load (``.json`` / ``.json.gz``) and check a COCO-format annotation file (errors name file, entry, field)."""
    data = load_json(path)
    check_coco(data, path, for_evaluation)
    return data
