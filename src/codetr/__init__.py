"""codetr: Co-DETR (Co-DINO) object detection with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
