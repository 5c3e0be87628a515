"""Planning and running the claim's training jobs.

A run is one model (a ``conf/model/`` choice) and one seed, trained by ``python -m codetr.train`` in a subprocess
with the budget every run shares (:class:`Budget`: experiment, epochs, steps per epoch, validation batches, extra
overrides, one generated dataset for all runs or one each) in its own directory ``<budget dir>/<model>/seed<k>``,
its output in ``train.log`` there. When the subprocess ends, the validation AP of every epoch is read from the run's
``csv/metrics.csv`` and written with the budget to ``claim_run.json`` (``wall_s``: the call that finished it). A run
with that file (same budget) is finished and skipped; a run without it is started with ``ckpt_path=last_if_exists``,
so a run killed half-way resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

RESULT_FILE = "claim_run.json"
LOG_FILE = "train.log"


@dataclass(frozen=True)
class Budget:
    """What every run of a comparison shares. ``steps_per_epoch`` / ``val_batches``: None = the whole split."""

    experiment: str
    epochs: int
    steps_per_epoch: int | None
    val_batches: int | None
    train_overrides: tuple[str, ...] = ()
    shared_data: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"claim: epochs must be >= 1, got {self.epochs}")
        for key in ("steps_per_epoch", "val_batches"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"claim: {key} must be >= 1 or null (the whole split), got {value}")

    @property
    def name(self) -> str:
        """Directory name, e.g. ``demo_e3_s64_vall``; extra overrides add a short hash of them."""
        steps = "all" if self.steps_per_epoch is None else self.steps_per_epoch
        val = "all" if self.val_batches is None else self.val_batches
        name = f"{self.experiment}_e{self.epochs}_s{steps}_v{val}"
        if self.train_overrides:
            name += "_" + hashlib.sha1("\n".join(self.train_overrides).encode()).hexdigest()[:8]
        return name

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "train_overrides": list(self.train_overrides)}


@dataclass(frozen=True)
class ClaimRun:
    model: str
    seed: int
    run_dir: Path
    budget: Budget = field(repr=False)

    @property
    def result_file(self) -> Path:
        return self.run_dir / RESULT_FILE

    def command(self, python: str = sys.executable) -> list[str]:
        """The ``codetr.train`` command line of this run (CSV logger forced: the AP per epoch is read from it)."""
        budget = self.budget
        overrides = [f"experiment={budget.experiment}", f"model={self.model}", f"seed={self.seed}",
                     f"trainer.max_epochs={budget.epochs}", "logger=csv", "++callbacks.progress_bar=null",
                     f"hydra.run.dir={self.run_dir}", "ckpt_path=last_if_exists"]
        if budget.steps_per_epoch is not None:
            overrides.append(f"++trainer.limit_train_batches={budget.steps_per_epoch}")
        if budget.val_batches is not None:
            overrides.append(f"++trainer.limit_val_batches={budget.val_batches}")
        if budget.shared_data:  # <budget dir>/<model>/seed<k> -> <budget dir>/data
            overrides.append(f"data.root={self.run_dir.parent.parent / 'data'}")
        return [python, "-m", "codetr.train", *overrides, *budget.train_overrides]

    def finished(self) -> dict[str, Any] | None:
        """The stored result when this run finished under the same budget, else None."""
        if not self.result_file.is_file():
            return None
        result = json.loads(self.result_file.read_text())
        same = result.get("budget") == self.budget.to_dict() and result.get("model") == self.model
        return result if same and result.get("seed") == self.seed else None


def available_models() -> set[str]:
    """The ``model=`` choices that exist (``conf/model/*.yaml``)."""
    return {p.name.removesuffix(".yaml") for p in files("codetr.conf").joinpath("model").iterdir()
            if p.name.endswith(".yaml")}


def select_pairs(pairs: Sequence[Sequence[str]], select: Sequence[str] | None,
                 available: set[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs to run, messages about pairs left out). ``select`` names pairs by their first model; None = every pair
    whose model configs exist. A selected pair with a missing config, or an unknown name, is an error."""
    checked: list[tuple[str, str]] = []
    for pair in pairs:
        if len(pair) != 2 or not all(isinstance(m, str) for m in pair):
            raise ValueError(f"claim: each entry of pairs is [model with auxiliary branches, model without], "
                             f"got {list(pair)!r}")
        checked.append((pair[0], pair[1]))
    by_name = {pair[0]: pair for pair in checked}
    if select is not None:
        unknown = [name for name in select if name not in by_name]
        if unknown:
            raise ValueError(f"claim: select={list(select)} names {unknown}, not the first model of a pair "
                             f"(pairs: {[list(p) for p in checked]})")
        chosen = [by_name[name] for name in select]
    else:
        chosen = checked
    kept, skipped = [], []
    for pair in chosen:
        missing = [m for m in pair if m not in available]
        if not missing:
            kept.append(pair)
            continue
        message = (f"claim: pair {list(pair)}: no model config {', '.join(f'conf/model/{m}.yaml' for m in missing)} "
                   f"(models: {sorted(available)})")
        if select is not None:
            raise ValueError(message)
        skipped.append(message + "; pair skipped")
    if not kept:
        raise ValueError("claim: no pair to run: " + "; ".join(skipped))
    return kept, skipped


def plan_runs(pairs: Sequence[tuple[str, str]], seeds: Sequence[int], budget: Budget,
              budget_dir: Path) -> list[ClaimRun]:
    """Every model of every pair with every seed, seed-major so that early results already compare the pair."""
    if not seeds:
        raise ValueError("claim: seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"claim: seeds repeat: {list(seeds)}")
    return [ClaimRun(model, int(seed), budget_dir / model / f"seed{seed}", budget)
            for seed in seeds for pair in pairs for model in pair]


def read_epoch_metrics(metrics_csv: Path, keys: Sequence[str] = ("val/AP", "val/AP50")) -> dict[str, list[float]]:
    """Validation metrics per epoch (index = epoch) from a Lightning CSV log; a replayed epoch's later row wins."""
    if not metrics_csv.is_file():
        raise FileNotFoundError(f"claim: no metrics log {metrics_csv}")
    by_epoch: dict[int, dict[str, float]] = {}
    with metrics_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get(keys[0]) and row.get("epoch"):
                by_epoch[int(float(row["epoch"]))] = {k: float(row[k]) for k in keys if row.get(k)}
    epochs = sorted(by_epoch)
    if epochs != list(range(len(epochs))):
        raise ValueError(f"claim: {metrics_csv} has {keys[0]} for epochs {epochs}, not 0..{len(epochs) - 1}")
    return {k: [by_epoch[e][k] for e in epochs] for k in keys}


def train_run(run: ClaimRun, python: str = sys.executable) -> dict[str, Any]:
    """Trains (or resumes) one run in a subprocess and stores its AP per epoch; raises naming the log on failure."""
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run.run_dir / LOG_FILE
    command = run.command(python)
    start = time.perf_counter()
    with log_path.open("a") as log:
        log.write(f"\n# claim: {' '.join(command)}\n")
        log.flush()
        code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    wall = time.perf_counter() - start
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise RuntimeError(f"claim: training {run.model} seed {run.seed} failed (exit {code}); "
                           f"log {log_path}:\n{tail}")
    metrics = read_epoch_metrics(run.run_dir / "csv" / "metrics.csv")
    if len(metrics["val/AP"]) != run.budget.epochs:
        raise RuntimeError(f"claim: {run.run_dir} logged val/AP for {len(metrics['val/AP'])} epochs, expected "
                           f"{run.budget.epochs} (log {log_path})")
    result = {"model": run.model, "seed": run.seed, "budget": run.budget.to_dict(), "ap": metrics["val/AP"],
              "ap50": metrics.get("val/AP50", []), "wall_s": round(wall, 1)}
    run.result_file.write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_all(runs: Sequence[ClaimRun], train_missing: bool = True, python: str = sys.executable,
            echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Results of every finished run, training the others one after another (``train_missing=False``: skip them)."""
    results = []
    for index, run in enumerate(runs, 1):
        prefix = f"[{index}/{len(runs)}] {run.model} seed {run.seed}"
        result = run.finished()
        if result is not None:
            echo(f"{prefix}: finished earlier ({run.result_file})")
        elif not train_missing:
            echo(f"{prefix}: not run yet, left out")
            continue
        else:
            echo(f"{prefix}: training in {run.run_dir} (log {run.run_dir / LOG_FILE})")
            result = train_run(run, python)
            echo(f"{prefix}: {result['wall_s']:.0f} s, AP per epoch "
                 + " / ".join(f"{100 * ap:.1f}" for ap in result["ap"]))
        results.append(result)
    return results
