"""codetr: Co-DETR (Co-DINO) object detection with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
__all__ = ["Detector", "TTAConfig"]


def __getattr__(name: str):
    # `from codetr import Detector` without importing torch / the models on `import codetr`
    if name in __all__:
        import codetr.inference

        return getattr(codetr.inference, name)
    raise AttributeError(f"module 'codetr' has no attribute {name!r}")
