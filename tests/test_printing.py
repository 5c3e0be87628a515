"""Metric tables: AR named by budget in COCO order, -1 (no ground truth in the range) shown as n/a, per-class
rows best first; the plain-text tables reach the run's log file (Hydra's file handler), not only the
console."""

from __future__ import annotations

import io
import logging

from rich.console import Console

from codetr.evaluation.summary import EvaluationDetails
from codetr.utils.printing import format_metric, metrics_table, per_class_table, print_metrics


def _text(table) -> str:
    console = Console(width=120, no_color=True, record=True, file=io.StringIO())
    console.print(table)
    return console.export_text()


def test_metrics_table_orders_ar_by_budget_and_shows_missing_ranges_as_na():
    text = _text(
        metrics_table({"val/AR@100": 0.5, "val/AP": 0.4, "val/APl": -1.0, "val/AR@1": 0.2, "val/AR@10": 0.45})
    )
    rows = [line.split("│")[1].strip() for line in text.splitlines() if line.count("│") == 3]
    assert rows == ["AP", "APl", "AR@1", "AR@10", "AR@100"]
    assert "n/a" in text and "-100" not in text and "40.0" in text
    assert format_metric(-1.0) == "n/a" and format_metric(0.5) == "50.0"


def test_per_class_table_is_sorted_best_first_with_classes_without_objects_last():
    details = EvaluationDetails(
        per_class=[
            {"category_id": 1, "name": "cat", "num_gt": 3, "AP": 0.2, "AP50": 0.5, "AP75": 0.1},
            {"category_id": 2, "name": "dog", "num_gt": 0, "AP": -1.0, "AP50": -1.0, "AP75": -1.0},
            {"category_id": 3, "name": "cow", "num_gt": 5, "AP": 0.7, "AP50": 0.9, "AP75": 0.8},
        ]
    )
    text = _text(per_class_table(details.sorted_per_class()))
    assert text.index("cow") < text.index("cat") < text.index("dog")
    assert "n/a" in text.split("dog")[1].splitlines()[0]


def test_printed_tables_are_written_to_the_log_file(tmp_path):
    handler = logging.FileHandler(tmp_path / "train.log")
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        print_metrics({"val/AP": 0.25, "val/AR@100": 0.5}, title="COCO box AP")
    finally:
        root.removeHandler(handler)
        handler.close()
    log = (tmp_path / "train.log").read_text()
    assert "COCO box AP" in log and "AR@100" in log and "25.0" in log
