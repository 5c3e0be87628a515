"""GPU check, part 4: a real ``python -m codetr.train`` run (the demo data and tiny model, bf16-mixed, a few dozen
steps) that ends with its COCO AP table; the row holds the validation metrics read back from the CSV logger.

The run's output goes straight to this process's output (progress for the reader); its run directory is a
temporary folder, removed afterwards.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from codetr.bench.gpu_child import CheckSizes, Reporter

CASE = "python -m codetr.train"
# Seconds kept back from the part's budget so that a run that overruns is stopped here and reported, before the
# parent stops this process.
MARGIN_S = 5.0


def read_metrics(csv_path: Path) -> dict:
    """The last logged value of every ``val/*`` metric and the number of optimiser steps logged."""
    if not csv_path.exists():
        raise FileNotFoundError(f"the run wrote no {csv_path}")
    last: dict[str, float] = {}
    steps = 0
    with csv_path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("step"):
                steps = max(steps, int(float(row["step"])) + 1)
            last.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v not in ("", None)})
    return {"val": last, "steps": steps}


def run(reporter: Reporter, sizes: CheckSizes) -> None:
    with tempfile.TemporaryDirectory(prefix="codetr-gpu-check-train-") as tmp:
        run_dir = Path(tmp) / "run"
        # The progress bar is off: its carriage-return redraws make no sense in a captured log.
        command = [sys.executable, "-m", "codetr.train", *sizes.train_overrides, f"hydra.run.dir={run_dir}",
                   "logger=csv", "~callbacks.progress_bar", "++trainer.enable_progress_bar=false"]
        if not reporter.fits(CASE, 2 * MARGIN_S):
            return
        timeout = reporter.remaining() - MARGIN_S
        reporter.case(CASE)
        print(" ".join(command), flush=True)
        start = time.monotonic()
        try:
            result = subprocess.run(command, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            reporter.skipped(CASE, f"time budget: the run was stopped after {timeout:.0f} s")
            return
        seconds = time.monotonic() - start
        if result.returncode != 0:
            reporter.failed(CASE, f"exit code {result.returncode} after {seconds:.0f} s (its output is above)")
            return
        found = read_metrics(run_dir / "csv" / "metrics.csv")
        if "val/AP" not in found["val"]:
            reporter.failed(CASE, f"the run logged no val/AP (logged: {sorted(found['val'])})")
            return
        metrics = {"wall_s": seconds, "optimiser_steps": found["steps"], "val": found["val"],
                   "overrides": list(sizes.train_overrides)}
        val = found["val"]
        reporter.measured(CASE, metrics, f"{found['steps']} steps in {seconds:.0f} s (start-up included), val AP "
                          f"{100 * val['val/AP']:.1f}, AP50 {100 * val.get('val/AP50', float('nan')):.1f}")
