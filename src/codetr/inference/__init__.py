"""Using a trained model: :class:`Detector` (Python API), test-time augmentation, export (ONNX, torch.export)."""

from codetr.inference.description import ModelDescription, describe, describe_recipe
from codetr.inference.detector import Detections, Detector
from codetr.inference.tta import TTAConfig

__all__ = ["Detections", "Detector", "ModelDescription", "TTAConfig", "describe", "describe_recipe"]
