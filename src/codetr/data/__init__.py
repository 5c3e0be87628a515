"""Data: COCO-format datasets, LSJ / DETR augmentation, Copy-Paste, collate, the demo dataset, the DataModule."""

from codetr.data.coco import CocoDetection, read_coco_json
from codetr.data.collate import DetectionBatch, collate, normalize_images
from codetr.data.datamodule import CocoDataModule, ImageFolderDataset
from codetr.data.synthetic import make_synthetic_coco

__all__ = ["CocoDataModule", "CocoDetection", "DetectionBatch", "ImageFolderDataset", "collate",
           "make_synthetic_coco", "normalize_images", "read_coco_json"]
