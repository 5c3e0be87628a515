"""What one COCO / LVIS evaluation yields besides the headline numbers: AR at each detection budget under its
own name, per-class AP and the precision-recall curves, read from faster-coco-eval's accumulated arrays.

``COCOeval.eval["precision"]`` is ``(T, R, K, A, M)``: T IoU thresholds (0.50:0.05:0.95), R = 101 recall
thresholds, K categories (``params.catIds`` order), A area ranges (0 = all), M detection budgets
(``params.maxDets``); ``eval["recall"]`` is ``(T, K, A, M)``. ``-1`` marks a category without ground truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# faster-coco-eval's summary labels -> the names codetr logs. Only labels whose meaning does not depend on the
# detection budget are taken from the summary; every AR is computed from the recall array and named after its
# budget ("AR@100", COCO's headline AR), because the summary's "AR_all" is AR@1 for COCO and AR@300 for LVIS.
AP_KEYS = {
    "AP_all": "AP",
    "AP_50": "AP50",
    "AP_75": "AP75",
    "AP_small": "APs",
    "AP_medium": "APm",
    "AP_large": "APl",
    "APr": "APr",
    "APc": "APc",
    "APf": "APf",
}
AREAS = {"s": 1, "m": 2, "l": 3}  # index into params.areaRng after "all"
# COCO's value for a metric with no ground truth in its range (e.g. APl without large objects)
NO_OBJECTS = -1.0


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(valid.mean()) if valid.size else NO_OBJECTS


def recall_metrics(recall: np.ndarray, max_dets: list[int]) -> dict[str, float]:
    """``AR@<budget>`` for every budget, and ``ARs@``, ``ARm@``, ``ARl@`` at the largest one (as COCO / LVIS
    summarise): mean recall over IoU thresholds and categories with ground truth."""
    out = {f"AR@{budget}": _mean_valid(recall[:, :, 0, index]) for index, budget in enumerate(max_dets)}
    largest = max_dets[-1]
    for name, area in AREAS.items():
        out[f"AR{name}@{largest}"] = _mean_valid(recall[:, :, area, -1])
    return out


@dataclass
class EvaluationDetails:
    """Per-class AP and precision-recall curves of one evaluation (all areas, the largest detection budget).

    ``per_class``: one dict per category, ``{"category_id", "name", "num_gt", "AP", "AP50", "AP75"}`` (AP
    values -1 when the category has no ground truth in the evaluated images). ``recall``: the R recall
    thresholds; ``curves``: ``{"AP50" | "AP75" | "AP": (R,) precision}`` averaged over categories with ground
    truth.
    """

    per_class: list[dict[str, Any]] = field(default_factory=list)
    recall: list[float] = field(default_factory=list)
    curves: dict[str, list[float]] = field(default_factory=dict)

    def sorted_per_class(self) -> list[dict[str, Any]]:
        """Categories by AP, best first; those without ground truth last."""
        return sorted(self.per_class, key=lambda row: (row["AP"] < 0, -row["AP"], str(row["name"])))

    def to_dict(self) -> dict[str, Any]:
        return {"per_class": self.sorted_per_class(), "pr_curves": {"recall": self.recall, **self.curves}}


def _curve(precision: np.ndarray) -> list[float]:
    """(T', R, K) precision -> (R,) mean over IoU thresholds and categories with values (-1 ignored)."""
    valid = precision > -1
    counts = valid.sum(axis=(0, 2))
    sums = np.where(valid, precision, 0.0).sum(axis=(0, 2))
    return [float(s / c) if c else 0.0 for s, c in zip(sums, counts)]


def evaluation_details(evaluator: Any, names: dict[int, str], num_gt: dict[int, int]) -> EvaluationDetails:
    """Per-class AP and PR curves from an accumulated ``COCOeval_faster`` (``names`` / ``num_gt``: by
    category id)."""
    # (T, R, K): all areas, the largest detection budget
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]
    iou = np.asarray(evaluator.params.iouThrs)
    at50, at75 = int(np.argmin(abs(iou - 0.5))), int(np.argmin(abs(iou - 0.75)))
    per_class = []
    for k, category_id in enumerate(int(c) for c in evaluator.params.catIds):
        per_class.append(
            {
                "category_id": category_id,
                "name": names.get(category_id, str(category_id)),
                "num_gt": int(num_gt.get(category_id, 0)),
                "AP": _mean_valid(precision[:, :, k]),
                "AP50": _mean_valid(precision[at50, :, k]),
                "AP75": _mean_valid(precision[at75, :, k]),
            }
        )
    curves = {
        "AP50": _curve(precision[at50 : at50 + 1]),
        "AP75": _curve(precision[at75 : at75 + 1]),
        "AP": _curve(precision),
    }
    return EvaluationDetails(per_class, [float(r) for r in evaluator.params.recThrs], curves)
