"""The claim's table and plot: validation AP per epoch of each model of each pair, over seeds.

:func:`summarise` groups the runs' results (``claim_run.json`` contents: ``model``, ``seed``, ``ap`` per epoch in
[0, 1]) by pair and model; :func:`write_report` writes ``claim.json`` (every seed's AP and the statistics),
``claim.md`` (one table per pair: mean +- sample standard deviation and min-max over seeds, AP x 100, and the
difference of the means) and ``claim.png`` (mean per epoch, min-max band, every seed's points).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "min": min(values), "max": max(values)}


def summarise(results: Sequence[dict[str, Any]], pairs: Sequence[tuple[str, str]],
              budget: dict[str, Any]) -> dict[str, Any]:
    """``{"budget", "pairs": [{"with_aux", "without_aux", "epochs", "models": {name: {"seeds", "ap" (x100, per seed
    per epoch), "per_epoch": [stats], "wall_s"}}, "delta_mean"}]}``; a model without finished runs has no entry and
    its pair no ``delta_mean``."""
    summary: dict[str, Any] = {"budget": budget, "unit": "COCO box AP x 100 on the validation split", "pairs": []}
    for with_aux, without_aux in pairs:
        entry: dict[str, Any] = {"with_aux": with_aux, "without_aux": without_aux, "epochs": budget["epochs"],
                                 "models": {}}
        for model in (with_aux, without_aux):
            runs = sorted((r for r in results if r["model"] == model), key=lambda r: r["seed"])
            if not runs:
                continue
            ap = [[100.0 * v for v in r["ap"]] for r in runs]
            entry["models"][model] = {
                "seeds": [r["seed"] for r in runs], "ap": ap,
                "per_epoch": [_stats([seed_ap[e] for seed_ap in ap]) for e in range(budget["epochs"])],
                "wall_s": [r.get("wall_s") for r in runs]}
        if len(entry["models"]) == 2:
            means = [[s["mean"] for s in entry["models"][m]["per_epoch"]] for m in (with_aux, without_aux)]
            entry["delta_mean"] = [a - b for a, b in zip(*means, strict=True)]
        summary["pairs"].append(entry)
    return summary


def _cell(stats: dict[str, float | None]) -> str:
    spread = "" if stats["std"] is None else f" ± {stats['std']:.1f}"
    return f"{stats['mean']:.1f}{spread} ({stats['min']:.1f}–{stats['max']:.1f})"


def markdown(summary: dict[str, Any]) -> str:
    budget = summary["budget"]
    steps = budget["steps_per_epoch"] or "all"
    val = budget["val_batches"] or "all"
    lines = [f"Validation AP (x100) per epoch: mean ± sample std (min–max) over seeds. "
             f"experiment={budget['experiment']}, {budget['epochs']} epochs x {steps} steps, "
             f"validation batches: {val}"
             + (f", overrides: {' '.join(budget['train_overrides'])}" if budget["train_overrides"] else "") + "."]
    for pair in summary["pairs"]:
        models = [m for m in (pair["with_aux"], pair["without_aux"]) if m in pair["models"]]
        if not models:
            continue
        lines += ["", f"**{pair['with_aux']}** (auxiliary branches) vs **{pair['without_aux']}** (without)", ""]
        header = ["epoch"] + [f"{m} (seeds {','.join(map(str, pair['models'][m]['seeds']))})" for m in models]
        if "delta_mean" in pair:
            header.append("Δ mean")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for epoch in range(pair["epochs"]):
            row = [str(epoch + 1)] + [_cell(pair["models"][m]["per_epoch"][epoch]) for m in models]
            if "delta_mean" in pair:
                row.append(f"{pair['delta_mean'][epoch]:+.1f}")
            lines.append("| " + " | ".join(row) + " |")
        walls = [f"{m} {statistics.fmean(w):.0f} s" for m in models
                 if (w := [x for x in pair["models"][m]["wall_s"] if x is not None])]
        if walls:
            lines += ["", "Mean wall time per run: " + ", ".join(walls) + "."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [p for p in summary["pairs"] if p["models"]]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6 * len(pairs), 4), squeeze=False)
    for ax, pair in zip(axes[0], pairs, strict=True):
        epochs = list(range(1, pair["epochs"] + 1))
        for model, colour in zip((pair["with_aux"], pair["without_aux"]), ("tab:red", "tab:blue"), strict=True):
            if model not in pair["models"]:
                continue
            data = pair["models"][model]
            stats = data["per_epoch"]
            ax.plot(epochs, [s["mean"] for s in stats], "-o", color=colour, label=f"{model} (n={len(data['seeds'])})")
            ax.fill_between(epochs, [s["min"] for s in stats], [s["max"] for s in stats], color=colour, alpha=0.2)
            for seed_ap in data["ap"]:
                ax.plot(epochs, seed_ap, ".", color=colour, alpha=0.5)
        ax.set(title=f"{pair['with_aux']} vs {pair['without_aux']}", xlabel="epoch", ylabel="val AP (x100)",
               xticks=epochs)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("mean over seeds, band = min–max, dots = single seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(summary: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Writes ``claim.json``, ``claim.md`` and ``claim.png`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "claim.json", "markdown": out_dir / "claim.md", "plot": out_dir / "claim.png"}
    paths["json"].write_text(json.dumps(summary, indent=1) + "\n")
    paths["markdown"].write_text(markdown(summary))
    plot(summary, paths["plot"])
    return paths
