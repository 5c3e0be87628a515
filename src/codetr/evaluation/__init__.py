"""COCO / LVIS box AP on the original annotations (a ``torchmetrics.Metric``), per-class AP and PR curves."""

from codetr.evaluation.coco import COCO_METRICS, LVIS_METRICS, CocoEvaluator
from codetr.evaluation.summary import EvaluationDetails

__all__ = ["COCO_METRICS", "LVIS_METRICS", "CocoEvaluator", "EvaluationDetails"]
