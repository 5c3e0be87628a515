"""Console output: the composed config as a rich tree and metric tables."""

from __future__ import annotations

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

METRIC_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf", "AR1", "AR10", "AR100")


def metrics_table(metrics: Mapping[str, float], title: str = "COCO box AP") -> Table:
    """A two-column table of AP-style metrics (``val/AP`` or ``AP`` keys; values in [0, 1] shown x100)."""
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    short = {k.split("/")[-1]: float(v) for k, v in metrics.items()}
    ordered = [k for k in METRIC_ORDER if k in short] + sorted(k for k in short if k not in METRIC_ORDER)
    for key in ordered:
        table.add_row(key, f"{100 * short[key]:.1f}" if 0.0 <= short[key] <= 1.0 else f"{short[key]:.4g}")
    return table


def print_metrics(metrics: Mapping[str, float], title: str = "COCO box AP") -> None:
    Console().print(metrics_table(metrics, title))


def print_config(cfg: DictConfig) -> None:
    Console().print(OmegaConf.to_yaml(cfg, resolve=True))
