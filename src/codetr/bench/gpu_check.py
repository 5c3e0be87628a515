"""GPU evidence in one short run: ``python -m codetr.bench.gpu_check [--dry-run] [--out DIR] [--parts ...]``
(``make gpu-check``; on a machine without codetr's dependencies, ``tools/gpu_check.sh`` installs the carried wheels
first).

Five parts, each in a child process (:mod:`codetr.bench.gpu_child`) with its own time budget:

1. ``triton``: the Triton deformable-attention kernels vs the exact path at the R50 encoder's shapes
   (:mod:`codetr.bench.gpu_attention`);
2. ``r50``: R50 Co-DINO at 1024 x 1024, batch 2, every auxiliary branch: training images/s in bf16-mixed and fp32
   with and without the recipe's encoder checkpointing, inference images/s, peak memory and the per-component
   breakdown (:mod:`codetr.bench.gpu_detector`);
3. ``swin_l``: Swin-L at 1280, batch 1, the recipe's checkpointing: step time and peak memory;
4. ``train``: a real ``python -m codetr.train`` run on the demo data in bf16 ending with its AP table
   (:mod:`codetr.bench.gpu_train`);
5. ``compile``: ``torch.compile`` of the recipe's regions: compile time and step time after it.

A part whose budget is spent is stopped (its whole process group) and recorded with the case it was running; the
time a part leaves unused passes to the next; once the check's total budget is spent the remaining parts are
skipped with that reason. Every row is written to ``<out>/gpu_check.json`` as it arrives (a killed run leaves
every finished number); the table is printed at the end and saved as ``<out>/gpu_check.txt``.

``--dry-run`` rehearses everything on the CPU at tiny sizes (the Triton kernels in Triton's interpreter) in about
a minute: CI runs it (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text

from codetr.bench.gpu_child import CASE_PREFIX, ROW_PREFIX
from codetr.bench.gpu_verdicts import machine, verdicts

PARTS = ("triton", "r50", "swin_l", "train", "compile")
# Seconds per part on one H100 / H200, and for the whole check (the device's single command may run 10 minutes;
# the check has to end in 8 with the wheel installation and the start-up in front of it).
BUDGETS_S = {"triton": 60, "r50": 150, "swin_l": 60, "train": 75, "compile": 95}
TOTAL_BUDGET_S = 450
# The CPU rehearsal: generous, so that a slow CI machine never skips (the test checks that nothing is skipped).
DRY_BUDGETS_S = {"triton": 150, "r50": 150, "swin_l": 120, "train": 150, "compile": 150}
DRY_TOTAL_BUDGET_S = 900
MIN_PART_S = 10.0  # a part with less time than this left is skipped, not started
KILL_GRACE_S = 5.0  # past its budget, a part's process group is killed
HEARTBEAT_S = 30.0  # a "still running" line when a part has been silent this long


@dataclass
class ChildResult:
    status: str  # done | failed | killed
    reason: str
    seconds: float
    last_case: str | None


def run_child(command: list[str], budget_s: float, on_line, heartbeat_s: float = HEARTBEAT_S,
              env: dict | None = None) -> ChildResult:
    """Runs ``command`` in its own process group, hands every output line to ``on_line`` as it comes, and kills
    the whole group once ``budget_s`` has passed. Never waits longer than that (plus the time to reap it)."""
    start = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                               start_new_session=True, env=env)
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    tail: collections.deque = collections.deque(maxlen=6)
    last_case, killed = None, False
    while True:
        left = budget_s - (time.monotonic() - start)
        if left <= 0:
            os.killpg(process.pid, signal.SIGKILL)
            killed = True
            break
        try:
            line = lines.get(timeout=min(heartbeat_s, left))
        except queue.Empty:
            on_line(f"... still running ({time.monotonic() - start:.0f} s of {budget_s:.0f} s, case: {last_case})")
            continue
        if line is None:
            break
        if line.startswith(CASE_PREFIX):
            last_case = line[len(CASE_PREFIX):]
        elif not line.startswith(ROW_PREFIX) and line.strip():
            tail.append(line)
        on_line(line)
    returncode = process.wait()
    seconds = time.monotonic() - start
    if killed:
        return ChildResult("killed", f"time budget: stopped after {seconds:.0f} s while running: {last_case}",
                           seconds, last_case)
    if returncode != 0:
        return ChildResult("failed", f"exit code {returncode}: " + " | ".join(tail)[-600:], seconds, last_case)
    return ChildResult("done", "", seconds, last_case)


class Results:
    """The check's state, rewritten to ``path`` (atomically) after every change."""

    def __init__(self, path: Path, mode: str, total_budget_s: float):
        self.path = path
        self.state = {"mode": mode, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "total_budget_s": total_budget_s,
                      "machine": machine(), "parts": {}, "rows": [], "verdicts": []}
        self.write()

    def add_row(self, row: dict) -> None:
        self.state["rows"].append(row)
        self.write()

    def set_part(self, part: str, **info) -> None:
        self.state["parts"].setdefault(part, {}).update(info)
        self.write()

    def finish(self) -> None:
        self.state["verdicts"] = verdicts(self.state["rows"], self.state["mode"])
        self.state["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.write()

    def write(self) -> None:
        partial = self.path.with_suffix(".json.partial")
        partial.write_text(json.dumps(self.state, indent=1, default=str))
        os.replace(partial, self.path)


def parse_row(line: str) -> dict | None:
    """The row a child reported on ``line``, or None for any other line (a garbled row is shown as text)."""
    if not line.startswith(ROW_PREFIX):
        return None
    try:
        row = json.loads(line[len(ROW_PREFIX):])
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) and {"part", "case", "status"} <= set(row) else None


def run_part(part: str, budget_s: float, dry_run: bool, results: Results, console: Console) -> ChildResult:
    command = [sys.executable, "-m", "codetr.bench.gpu_child", part, "--budget-s", f"{budget_s:.0f}"]
    command += ["--dry-run"] if dry_run else []
    start = time.monotonic()

    def on_line(line: str) -> None:
        stamp = f"[{part} {time.monotonic() - start:5.0f}s]"
        row = parse_row(line)
        if row is not None:
            results.add_row(row)
            detail = row.get("summary") or row.get("reason", "")
            console.print(f"{stamp} {row['case']}: {row['status']}: {detail}", markup=False, highlight=False)
        elif line.startswith(CASE_PREFIX):
            console.print(f"{stamp} case: {line[len(CASE_PREFIX):]}", markup=False, highlight=False)
        else:
            console.print(f"{stamp} {line}", markup=False, highlight=False)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if dry_run:  # one thread: on a shared CPU, two spinning OpenMP threads per process made steps 50x slower
        env.setdefault("OMP_NUM_THREADS", "1")
    return run_child(command, budget_s + KILL_GRACE_S, on_line, env=env)


def run_check(parts: list[str], dry_run: bool, out_dir: Path, total_budget_s: float, console: Console) -> Results:
    budgets = DRY_BUDGETS_S if dry_run else BUDGETS_S
    results = Results(out_dir / "gpu_check.json", "dry-run" if dry_run else "full", total_budget_s)
    deadline = time.monotonic() + total_budget_s
    saved = 0.0
    for part in parts:
        left = deadline - time.monotonic() - KILL_GRACE_S
        budget = min(budgets[part] + saved, left)
        if budget < MIN_PART_S:
            reason = f"time budget: {max(left, 0):.0f} s of the check's {total_budget_s:.0f} s left"
            results.set_part(part, status="skipped", reason=reason, budget_s=round(budget, 1))
            console.print(f"[{part}] skipped: {reason}", markup=False)
            continue
        console.print(f"[{part}] starting, budget {budget:.0f} s", markup=False)
        results.set_part(part, status="running", budget_s=round(budget, 1))
        outcome = run_part(part, budget, dry_run, results, console)
        results.set_part(part, status=outcome.status, reason=outcome.reason, seconds=round(outcome.seconds, 1))
        saved = max(0.0, budget - outcome.seconds)
    results.finish()
    return results


def render_table(state: dict) -> Table:
    machine_info = state["machine"]
    title = (f"codetr GPU check ({state['mode']}) on {machine_info.get('cuda') or 'CPU'}, "
             f"torch {machine_info['torch']}, {state['started']}")
    table = Table(title=title, show_lines=False)
    for column in ("part", "case", "status", "result"):
        table.add_column(column, overflow="fold")
    for part, info in state["parts"].items():
        rows = [r for r in state["rows"] if r["part"] == part]
        for row in rows:
            cells = (part, row["case"], row["status"], row.get("summary") or row.get("reason", ""))
            table.add_row(*map(Text, cells))
        if info.get("status") != "done":
            table.add_row(*map(Text, (part, "(part)", info.get("status", "?"), info.get("reason", ""))))
    for verdict in state["verdicts"]:
        table.add_row(*map(Text, ("verdict", verdict["name"], verdict["status"], verdict["text"])))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (what CI runs)")
    parser.add_argument("--out", default="bench/results/gpu-check", help="folder for gpu_check.json / .txt")
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--total-budget-s", type=float, default=None,
                        help=f"seconds for the whole check (default {TOTAL_BUDGET_S}; dry run {DRY_TOTAL_BUDGET_S})")
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device here: the full check needs one GPU (--dry-run rehearses it on the CPU)")
    total = args.total_budget_s or (DRY_TOTAL_BUDGET_S if args.dry_run else TOTAL_BUDGET_S)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console = Console(width=170)
    results = run_check(parts, args.dry_run, out_dir, total, console)
    table = render_table(results.state)
    console.print(table)
    text_console = Console(width=170, record=True, file=open(os.devnull, "w"))  # noqa: SIM115 -- closed below
    text_console.print(table)
    (out_dir / "gpu_check.txt").write_text(text_console.export_text())
    text_console.file.close()
    console.print(f"wrote {out_dir / 'gpu_check.json'} and {out_dir / 'gpu_check.txt'}", markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
