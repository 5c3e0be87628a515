"""COCO / LVIS box AP on the original annotations."""

from codetr.evaluation.coco import CocoEvaluator

__all__ = ["CocoEvaluator"]
