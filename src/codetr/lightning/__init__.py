"""Lightning layer: the module (steps, logging, optimiser), optimiser groups and callbacks."""

from codetr.lightning.module import CoDETRModule, to_original_frame, total_loss

__all__ = ["CoDETRModule", "to_original_frame", "total_loss"]
