"""Console output: the composed config as a rich tree, metric tables and the per-class AP table. Tables are
also written to the ``codetr`` log (Hydra's ``<task>.log`` in the run directory) as plain text."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from codetr.utils.logs import log_to_files

METRIC_ORDER = (
    "AP",
    "AP50",
    "AP75",
    "APs",
    "APm",
    "APl",
    "APr",
    "APc",
    "APf",
    "AR@1",
    "AR@10",
    "AR@100",
    "AR@300",
    "ARs@100",
    "ARm@100",
    "ARl@100",
    "ARs@300",
    "ARm@300",
    "ARl@300",
)


def format_metric(value: float) -> str:
    """AP-style value in [0, 1] x100 with one decimal; ``n/a`` for COCO's -1 (no ground truth in the range,
    e.g. APl without large objects); anything else as is."""
    if value < 0:
        return "n/a"
    return f"{100 * value:.1f}" if value <= 1.0 else f"{value:.4g}"


def metrics_table(metrics: Mapping[str, float], title: str | None = None) -> Table:
    """A table of AP-style metrics (``val/AP`` or ``AP`` keys); with mask AP (``segm_`` keys) a ``box`` and a ``mask``
    column side by side. Default title: "COCO box AP" / "COCO box and mask AP"."""
    short = {k.split("/")[-1]: float(v) for k, v in metrics.items()}
    masks = {k.removeprefix("segm_"): v for k, v in short.items() if k.startswith("segm_")}
    table = Table(title=title or ("COCO box and mask AP" if masks else "COCO box AP"))
    table.add_column("metric")
    boxes = {k: v for k, v in short.items() if not k.startswith("segm_")}
    columns = [("box", boxes), ("mask", masks)] if masks else [("value", boxes)]
    for name, _ in columns:
        table.add_column(name, justify="right")
    names = set(boxes) | set(masks)
    ordered = [k for k in METRIC_ORDER if k in names] + sorted(k for k in names if k not in METRIC_ORDER)
    for key in ordered:
        table.add_row(key, *(format_metric(values[key]) if key in values else "" for _, values in columns))
    return table


def per_class_table(rows: Sequence[Mapping[str, Any]], title: str = "per-class box AP") -> Table:
    """Rows ``{"name", "category_id", "num_gt", "AP", "AP50", "AP75"}`` in the order given (best first)."""
    table = Table(title=title)
    for column in ("class", "id", "objects", "AP", "AP50", "AP75"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for row in rows:
        table.add_row(
            str(row["name"]),
            str(row["category_id"]),
            str(row["num_gt"]),
            *(format_metric(float(row[key])) for key in ("AP", "AP50", "AP75")),
        )
    return table


def _print(table: Table) -> None:
    """To the console (rich), and as plain text to the run's log file."""
    Console().print(table)
    plain = Console(width=120, no_color=True, record=True, file=io.StringIO())
    plain.print(table)
    log_to_files("\n" + plain.export_text())


def print_metrics(metrics: Mapping[str, float], title: str | None = None) -> None:
    _print(metrics_table(metrics, title))


def print_per_class(rows: Sequence[Mapping[str, Any]], title: str = "per-class box AP") -> None:
    _print(per_class_table(rows, title))


def print_config(cfg: DictConfig) -> None:
    Console().print(OmegaConf.to_yaml(cfg, resolve=True))
