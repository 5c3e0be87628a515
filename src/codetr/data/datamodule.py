"""LightningDataModule: COCO-format train / val / test datasets with the configured augmentation, a predict set
over an image file or folder, collate, and the matching evaluator."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors

from codetr.data.coco import CocoDetection, load_rgb
from codetr.data.collate import collate
from codetr.data.copy_paste import CopyPaste
from codetr.data.sampler import ResumableDataLoader, ResumableSampler, SeededSamples
from codetr.data.transforms import build_pipeline, pipeline_keys
from codetr.utils.config_keys import check_known_keys

log = logging.getLogger(__name__)
# aug keys read here rather than by the pipelines (Copy-Paste is LSJ-only)
LOADER_AUG_KEYS = ("name", "size_divisor")
COPY_PASTE_KEYS = ("copy_paste", "copy_paste_max", "copy_paste_box_shift", "copy_paste_min_area")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class ImageFolderDataset(Dataset):
    """Unannotated images (a file or a folder) for prediction; ``image_id`` = index into ``files``."""

    def __init__(self, source: str | Path, transform):
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"prediction input not found: {source}")
        self.files = [source] if source.is_file() else sorted(
            p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {source}")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        image = load_rgb(self.files[index])
        h, w = image.shape[-2:]
        sample = {"image": tv_tensors.Image(image),
                  "boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.zeros(0, dtype=torch.long), "image_id": index, "orig_size": (h, w)}
        return self.transform(sample)


def check_aug_keys(aug: Mapping) -> None:
    """Refuse ``aug`` keys that neither the pipelines nor the loaders read (e.g. ``+aug.scale=...``)."""
    copy_paste = COPY_PASTE_KEYS if aug.get("name") == "lsj" else ()
    check_known_keys(aug, {*LOADER_AUG_KEYS, *pipeline_keys(aug.get("name")), *copy_paste}, "aug")


def ignore_interrupts_in_worker(worker_id: int) -> None:
    """Loader workers ignore Ctrl-C: a terminal sends SIGINT to the whole process group, and a worker stopping on it
    would end the run with "DataLoader worker exited unexpectedly" instead of the main process's checkpoint and exit
    (:mod:`codetr.lightning.signals`). Seeds the worker as Lightning's own ``worker_init_fn`` would."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if int(os.environ.get("PL_SEED_WORKERS", "0")):
        pl_worker_init_function(worker_id)


def _ids(ids: list[int]) -> str:
    return str(ids) if len(ids) <= 10 else f"{ids[:10]}... ({len(ids)} in all)"


class CocoDataModule(pl.LightningDataModule):
    """Datasets, loaders and evaluators for one COCO-format dataset (COCO, LVIS, Objects365 or custom).

    Args:
        *_images / *_annotations: folders and json files per split (test defaults to val).
        predict_images: image file or folder for ``predict``.
        aug: the ``aug/*.yaml`` mapping (``name`` lsj / detr + parameters; LSJ's ``copy_paste*`` keys).
        seed: seeds the training order (per epoch, split across DDP ranks), each sample's augmentation and the
            workers' base seed; see :mod:`codetr.data.sampler`.
        lvis: evaluate with the LVIS protocol (default: detected from the annotation file).
        max_detections: detections per image kept by the evaluator (default: COCO 100, LVIS 300).
        num_classes: the model's class count (``data.num_classes``); every annotation file must have exactly this
            many categories (the same ids in every split), else setup stops naming the file and both numbers.
        max_image_pixels: images with more pixels are skipped and counted (decompression-bomb guard).
        max_boxes_per_image: training images with more usable boxes are dropped before training, with a warning.
    """

    def __init__(
        self,
        train_images: str | None = None,
        train_annotations: str | None = None,
        val_images: str | None = None,
        val_annotations: str | None = None,
        test_images: str | None = None,
        test_annotations: str | None = None,
        predict_images: str | None = None,
        aug: Mapping | None = None,
        batch_size: int = 2,
        val_batch_size: int = 1,
        num_workers: int = 2,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        min_size: int = 32,
        seed: int = 0,
        lvis: bool | None = None,
        max_detections: int | None = None,
        num_classes: int | None = None,
        max_image_pixels: int | None = None,
        max_boxes_per_image: int | None = None,
        with_masks: bool = False,
    ):
        super().__init__()
        self.paths = {"train": (train_images, train_annotations), "val": (val_images, val_annotations),
                      "test": (test_images or val_images, test_annotations or val_annotations)}
        self.predict_images = predict_images
        self.aug = dict(aug or {"name": "detr"})
        check_aug_keys(self.aug)
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.min_size, self.seed, self.lvis, self.max_detections = min_size, seed, lvis, max_detections
        self.expected_num_classes, self.max_image_pixels = num_classes, max_image_pixels
        self.max_boxes_per_image = max_boxes_per_image
        self.with_masks = with_masks  # instance masks in the training targets (a detector with a mask branch)
        self.datasets: dict[str, Dataset] = {}
        self.size_divisor = int(self.aug.get("size_divisor", 1))

    # ---------------------------------------------------------------- datasets
    def _check_paths(self, split: str) -> tuple[Path, Path]:
        images, annotations = self.paths[split]
        if images is None or annotations is None:
            raise ValueError(f"data.datamodule.{split}_images / {split}_annotations are not set")
        images, annotations = Path(images), Path(annotations)
        if not images.is_dir():
            raise FileNotFoundError(f"{split} image folder not found: {images}")
        if not annotations.is_file():
            raise FileNotFoundError(f"{split} annotation file not found: {annotations}")
        return images, annotations

    def _dataset(self, split: str) -> CocoDetection:
        images, annotations = self._check_paths(split)
        train = split == "train"
        lsj = self.aug.get("name") == "lsj"
        mix = None
        if train and lsj and self.aug.get("copy_paste", False):
            mix = CopyPaste(int(self.aug.get("copy_paste_max", 100)), float(self.aug.get("copy_paste_box_shift", 10)),
                            int(self.aug.get("copy_paste_min_area", 300)))
        dataset = CocoDetection(images, annotations, build_pipeline(self.aug, train),
                                with_masks=train and (lsj or self.with_masks),
                                mix=mix, min_size=self.min_size, max_image_pixels=self.max_image_pixels,
                                max_boxes_per_image=self.max_boxes_per_image if train else None,
                                for_evaluation=not train)
        self._check_categories(split, dataset)
        if train and dataset.num_boxes == 0:
            details = "; ".join(f"{n} {what}" for what, n in sorted(dataset.stats.items())) or "no annotations"
            raise ValueError(f"{annotations}: no usable training boxes in {len(dataset)} images ({details})")
        return dataset

    def _check_categories(self, split: str, dataset: CocoDetection) -> None:
        """The file's categories against ``num_classes`` and against the splits already built."""
        if self.expected_num_classes is not None and dataset.num_classes != self.expected_num_classes:
            raise ValueError(
                f"{dataset.annotation_file} has {dataset.num_classes} categories but data.num_classes="
                f"{self.expected_num_classes} (the model's class count): set data.num_classes={dataset.num_classes} "
                f"or use an annotation file with {self.expected_num_classes} categories")
        for other_split, other in self.datasets.items():
            if isinstance(other, CocoDetection) and other.category_ids != dataset.category_ids:
                raise ValueError(
                    f"{split} categories ({dataset.annotation_file}: ids {_ids(dataset.category_ids)}) differ from "
                    f"{other_split} categories ({other.annotation_file}: ids {_ids(other.category_ids)}); the labels "
                    "would mean different classes")

    def setup(self, stage: str | None = None) -> None:
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}.get(
            stage or "fit", ("train", "val"))
        for split in splits:
            if split not in self.datasets and self.paths[split][0] is not None:
                self.datasets[split] = self._dataset(split)
        if stage == "predict":
            if self.predict_images is None:
                raise ValueError("set predict_images (python -m codetr.predict input=<image or folder>)")
            self.datasets["predict"] = ImageFolderDataset(self.predict_images, build_pipeline(self.aug, train=False))

    def _reference(self) -> CocoDetection:
        for split in ("train", "val", "test"):
            if split in self.datasets:
                return self.datasets[split]
        for split in ("val", "train", "test"):
            if self.paths[split][1] is not None and Path(self.paths[split][1]).is_file():
                self.datasets[split] = self._dataset(split)
                return self.datasets[split]
        raise ValueError("no annotation file configured to read the categories from")

    @property
    def class_names(self) -> list[str]:
        return self._reference().class_names

    @property
    def category_ids(self) -> list[int]:
        return self._reference().category_ids

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def predict_files(self) -> list[Path]:
        return list(self.datasets["predict"].files)

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test", "predict": "predict"}[split])
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[split], batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(), persistent_workers=self.persistent_workers,
            collate_fn=partial(collate, size_divisor=self.size_divisor), drop_last=False, generator=generator,
            worker_init_fn=ignore_interrupts_in_worker,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch (``seed + epoch``, split across DDP ranks), every sample augmented with its own seed,
        and resumable mid-epoch: Lightning checkpoints the loader state (:mod:`codetr.data.sampler`)."""
        if "train" not in self.datasets:
            self.setup("fit")
        dataset = SeededSamples(self.datasets["train"])
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=ResumableSampler(dataset, shuffle=True, seed=self.seed),
            num_workers=self.num_workers, pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.persistent_workers,
            collate_fn=partial(collate, size_divisor=self.size_divisor, with_masks=self.with_masks),
            drop_last=False, generator=torch.Generator().manual_seed(self.seed),
            worker_init_fn=ignore_interrupts_in_worker,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", self.val_batch_size, shuffle=False)

    # ---------------------------------------------------------------- evaluation
    def evaluator(self, stage: str):
        """A fresh :class:`~codetr.evaluation.CocoEvaluator` for ``val`` / ``test`` on the original annotations."""
        from codetr.evaluation import CocoEvaluator

        split = "test" if stage == "test" else "val"
        annotations = self.paths[split][1]
        if annotations is None:
            return None
        if split not in self.datasets:
            self.datasets[split] = self._dataset(split)  # checks the file once (categories, evaluation ids)
        dataset = self.datasets[split]
        lvis = dataset.lvis_format if self.lvis is None else self.lvis
        return CocoEvaluator(annotations, dataset.category_ids, lvis=lvis, max_detections=self.max_detections,
                             segm=self.with_masks)
