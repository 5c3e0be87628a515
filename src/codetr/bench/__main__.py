"""``python -m codetr.bench [--suites attention,model,data,evaluation,memory,inference] [--device cpu]
[--out bench/results]``.

Prints one table per suite and writes every row to ``<out>/<suite>-<timestamp>.json`` (machine, threads,
parameters, all repeat times, median, min, peak memory).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

SUITES = {
    "attention": "codetr.bench.attention",
    "model": "codetr.bench.model",
    "data": "codetr.bench.data",
    "evaluation": "codetr.bench.evaluation",
    "memory": "codetr.bench.memory",
    "inference": "codetr.bench.inference",
}


def machine() -> dict:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--suites", default=",".join(SUITES), help="comma-separated subset of " + ", ".join(SUITES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    console = Console(width=160)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for suite in [s.strip() for s in args.suites.split(",") if s.strip()]:
        if suite not in SUITES:
            raise SystemExit(f"unknown suite {suite!r}; choose from {', '.join(SUITES)}")
        module = importlib.import_module(SUITES[suite])
        rows = module.run(device=args.device, repeats=args.repeats)
        table = Table(title=f"codetr bench: {suite} ({args.device}, {torch.get_num_threads()} threads)")
        for column in ("benchmark", "parameters", "median s", "min s", "peak MiB", "notes"):
            table.add_column(column)
        for row in rows:
            params = ", ".join(f"{k}={v}" for k, v in row.params.items())
            peak = f"{row.peak_mem_mib:.0f}" if row.peak_mem_mib is not None else "-"
            notes = ", ".join(f"{k}={v}" for k, v in row.extra.items())
            median, fastest = (f"{t:.3f}" if t is not None else "-" for t in (row.median_s, row.min_s))
            table.add_row(row.name, params, median, fastest, peak, notes)
        console.print(table)
        path = out_dir / f"{suite}-{stamp}.json"
        path.write_text(json.dumps({"machine": machine(), "rows": [r.as_dict() for r in rows]}, indent=1))
        console.print(f"wrote {path}")


if __name__ == "__main__":
    main()
