"""Backbones: ``forward(images (B, 3, H, W)) -> list of NCHW maps`` with an ``out_channels`` list attribute."""

from codetr.models.backbones.resnet import ResNet
from codetr.models.backbones.swin import SwinTransformer
from codetr.models.backbones.vit import ViT

__all__ = ["ResNet", "SwinTransformer", "ViT"]
