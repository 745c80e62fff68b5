"""The image data sources: bundled real sets (digits, faces, photo tiles) and the user's own images
in standard formats, each a config section that loads itself into a ``DataBundle`` of images with
their ``ImageSpec`` (registered in ``data.SOURCES``)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import DirectoryPath, Field, FilePath

from gradleak.data.dataset import DataBundle, Dataset, stratified_split
from gradleak.data.sources import SOURCES, SourceConfig
from gradleak.images import bundled, formats
from gradleak.images.data import channel_stats, resize, set_channels
from gradleak.images.spec import ImageSpec
from gradleak.resources import check_images_fit


class _Source(SourceConfig):
    kind: ClassVar[str] = "image"
    image_size: int = Field(
        32, ge=4, le=1024, description="Images are resized to this square size."
    )
    channels: Literal[1, 3] | None = Field(
        None, description="Convert to 1 (grayscale) or 3 (RGB) channels; null keeps the source's."
    )

    def _bundle(self, name: str, train: Dataset, test: Dataset, classes) -> DataBundle:
        mean, std = channel_stats(train.examples)
        c, h, w = train.examples.shape[1:]
        return DataBundle(
            name, train, test, tuple(classes), ImageSpec((int(c), int(h), int(w)), mean, std)
        )

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        check_images_fit(len(images), self.channels or images.shape[1], self.image_size)
        return resize(set_channels(images, self.channels), self.image_size)


class _HeldOut(_Source):
    test_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Fraction of each class held out as the global test split."
    )

    def _split(self, name: str, images: torch.Tensor, labels: torch.Tensor, classes, seed: int):
        images = self._prepare(images)
        keep, held = stratified_split(labels.numpy(), self.test_fraction, seed)
        full = Dataset(images, labels)
        return self._bundle(name, full.subset(keep), full.subset(held), classes)


class DigitsSource(_HeldOut):
    """scikit-learn's handwritten digits (1,797 images, 8 x 8 upsampled, 10 classes)."""

    source: Literal["digits"] = "digits"

    def load(self, seed: int) -> DataBundle:
        return self._split("digits", *bundled.load_digits(), seed)


class FacesSource(_HeldOut):
    """scikit-image's LFW subset: 100 faces and 100 non-faces, 25 x 25 grayscale (binary task)."""

    source: Literal["faces"] = "faces"

    def load(self, seed: int) -> DataBundle:
        return self._split("faces", *bundled.load_faces(), seed)


class TilesSource(_HeldOut):
    """RGB tiles cut from scikit-image's colour photographs, labelled by photograph."""

    source: Literal["tiles"] = "tiles"
    photos: list[str] = Field(
        default_factory=lambda: list(bundled.PHOTOS),
        min_length=2,
        description=f"Photographs to cut, one class each (bundled: {', '.join(bundled.PHOTOS)}).",
    )
    stride: int | None = Field(None, ge=1, description="Pixels between tiles; null = image_size.")
    max_per_photo: int | None = Field(
        400, ge=1, description="Keep at most this many tiles per photograph (seeded choice)."
    )
    scale: float = Field(
        1.0,
        gt=0,
        le=1,
        description="Shrink the photographs by this factor before cutting (1: native "
        "resolution; smaller: each tile holds more of the scene).",
    )
    min_std: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Leave out tiles whose pixels vary less than this (flat sky, "
        "black space), which are near-duplicates of each other.",
    )

    def load(self, seed: int) -> DataBundle:
        images, labels, classes = bundled.load_tiles(
            self.photos,
            self.image_size,
            self.stride or self.image_size,
            self.max_per_photo,
            seed,
            self.scale,
            self.min_std,
        )
        return self._split("tiles", images, labels, classes, seed)


class ImageFolderSource(_HeldOut):
    """A folder with one sub-folder of images per class."""

    source: Literal["image-folder"] = "image-folder"
    root: DirectoryPath = Field(description="The folder holding one sub-folder per class.")
    channels: Literal[1, 3] | None = Field(3, description="1 for grayscale, 3 for RGB.")
    allow_outside_root: bool = Field(
        False,
        description="Read images whose path (after '..' and symbolic links) lies outside root; "
        "off, so that a symbolic link cannot pull other files into the training set.",
    )

    def load(self, seed: int) -> DataBundle:
        images, labels, classes = formats.load_image_folder(
            self.root, self.image_size, self.channels or 3, self.allow_outside_root
        )
        return self._split(self.root.name, images, labels, classes, seed)


class Cifar10Source(_Source):
    """CIFAR-10 python batches (``data_batch_1..5`` for clients, ``test_batch`` for testing)."""

    source: Literal["cifar10"] = "cifar10"
    root: DirectoryPath = Field(
        description="The folder holding the batches (or cifar-10-batches-py/)."
    )

    def load(self, seed: int) -> DataBundle:
        (x_tr, y_tr), (x_te, y_te), classes = formats.load_cifar10(self.root)
        train = Dataset(self._prepare(x_tr), y_tr)
        test = Dataset(self._prepare(x_te), y_te)
        return self._bundle("cifar10", train, test, classes)


class SplitListSource(_Source):
    """Images listed in MONAI-style JSON split lists, as in the COVID-19 Radiography Database."""

    source: Literal["split-list"] = "split-list"
    root: DirectoryPath = Field(
        description="The data root that image paths in the split file are relative to."
    )
    split_file: FilePath = Field(description="JSON file with 'training' and 'testing' lists.")
    test_split: str = Field("testing", description="Which list is the global test split.")
    channels: Literal[1, 3] | None = Field(1, description="1 for grayscale (X-rays), 3 for RGB.")
    class_names: list[str] | None = Field(
        None, description="Names of classes 0, 1, ...; null names them by index."
    )
    allow_outside_root: bool = Field(
        False,
        description="Read images whose path (after '..' and symbolic links) lies outside root; "
        "off, so that a split list's absolute or '../' path, or a symbolic link, cannot pull other "
        "files into the training set.",
    )

    def load(self, seed: int) -> DataBundle:
        (x_tr, y_tr), (x_te, y_te) = formats.load_split_list(
            self.split_file,
            self.root,
            self.image_size,
            self.channels or 1,
            self.test_split,
            self.allow_outside_root,
        )
        n = int(max(y_tr.max(), y_te.max())) + 1
        classes = self.class_names or [f"class_{i}" for i in range(n)]
        if len(classes) < n:
            from gradleak.errors import DataError

            raise DataError(
                f"{self.split_file}: labels go up to {n - 1} but class_names has {len(classes)}"
            )
        return self._bundle(self.root.name, Dataset(x_tr, y_tr), Dataset(x_te, y_te), classes)


for _cls in (
    DigitsSource,
    FacesSource,
    TilesSource,
    ImageFolderSource,
    Cifar10Source,
    SplitListSource,
):
    SOURCES.register(_cls.model_fields["source"].default)(_cls)

__all__ = [
    "Cifar10Source",
    "DigitsSource",
    "FacesSource",
    "ImageFolderSource",
    "SplitListSource",
    "TilesSource",
]
