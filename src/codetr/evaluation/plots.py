"""Precision-recall curves of one evaluation as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from codetr.evaluation.summary import EvaluationDetails

CURVE_LABELS = {"AP50": "IoU 0.50", "AP75": "IoU 0.75", "AP": "IoU 0.50:0.95 (mean)"}


def plot_pr_curves(
    details: EvaluationDetails, path: str | Path, title: str = "precision-recall, all classes"
) -> Path:
    """Writes the class-averaged precision-recall curves (AP50 / AP75 / AP) of ``details`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 4), dpi=100)
    try:
        for key, label in CURVE_LABELS.items():
            if key in details.curves:
                axes.plot(details.recall, details.curves[key], label=label)
        axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
        axes.grid(alpha=0.3)
        axes.legend(loc="lower left")
        figure.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
    finally:
        plt.close(figure)
    return path
