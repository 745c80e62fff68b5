"""A saved update of an image classifier (``gradleak attack --meta`` with ``modality: image``, the
default): what the images are, how the client normalised them, how it ran batch norm."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from gradleak.attacks.files import UpdateMetadata, load_tensors
from gradleak.errors import DataError
from gradleak.images.formats import read_image
from gradleak.images.render import grid_png
from gradleak.images.spec import ImageSpec
from gradleak.modality import METADATA
from gradleak.safeio import npz_bytes


@METADATA.register("image")
class ImageUpdateMetadata(UpdateMetadata):
    """The metadata of an image classifier's update."""

    modality: Literal["image"] = Field("image", description="The kind of data: image.")
    num_images: int = Field(gt=0, description="Images the client trained on this round.")
    image_shape: tuple[int, int, int] = Field(description="Channels, height, width.")
    batch_norm: Literal["train", "eval", "auto"] = Field(
        "auto",
        description="How the client ran batch-norm layers: train (batch statistics, running "
        "statistics updated), eval (running statistics, buffers unchanged), or auto: eval when "
        "every "
        "running mean and variance in the update is unchanged, else train.",
    )
    mean: list[float] = Field(
        description="Per-channel normalisation mean of the client's input pipeline."
    )
    std: list[float] = Field(description="Per-channel normalisation std.")

    @model_validator(mode="after")
    def _normalisation(self) -> ImageUpdateMetadata:
        self.spec()  # the spec checks its normalisation
        return self

    @property
    def num_examples(self) -> int:
        return self.num_images

    def bn_mode(self) -> str | None:
        return None if self.batch_norm == "auto" else self.batch_norm

    def spec(self) -> ImageSpec:
        return ImageSpec(self.image_shape, tuple(self.mean), tuple(self.std))

    def load_truth(self, path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
        """True images (N x C x H x W in [0, 1]) and optional labels from an npz file."""
        t = load_tensors(path)
        if "images" not in t:
            raise DataError(f"{path} has no 'images' array")
        images = t["images"].float()
        shape = (self.num_images, *self.image_shape)
        if tuple(images.shape) != shape:
            raise DataError(
                f"{path}: images have shape {tuple(images.shape)}, the update is of {shape}"
            )
        labels = t["labels"].long() if "labels" in t else None
        if labels is not None and (
            labels.shape != (self.num_images,)
            or labels.min() < 0
            or labels.max() >= self.num_classes
        ):
            raise DataError(
                f"{path}: 'labels' must be {self.num_images} class indices from 0 to "
                f"{self.num_classes - 1}"
            )
        return images, labels

    def load_prior(self, path: Path) -> torch.Tensor:
        """A starting image (1 x C x H x W in [0, 1]) from an npz 'images' array or an image
        file."""
        c, h, w = self.image_shape
        if path.suffix.lower() == ".npz":
            images = load_tensors(path).get("images")
            if images is None or tuple(images.shape[1:]) != (c, h, w):
                raise DataError(f"{path}: expected 'images' of shape N x {c} x {h} x {w}")
            return images.float()
        return torch.from_numpy(read_image(path, h, c))[None]

    def write_result(self, owner: Any, rec: Any, truth: torch.Tensor | None, found: Any) -> None:
        """``reconstruction.npz`` (``images`` N x C x H x W in [0, 1], ``labels``, ``prior``: the
        optimisation's start) and ``reconstruction.png`` (beside the originals when given)."""
        if rec.examples is None:
            return
        start = rec.start if rec.start is not None else torch.zeros_like(rec.examples)
        labels = rec.labels.numpy() if rec.labels is not None else np.zeros(0, dtype=np.int64)
        owner.write_bytes(
            "reconstruction.npz",
            npz_bytes(
                images=rec.examples.numpy().astype(np.float32),
                labels=labels,
                prior=start.numpy().astype(np.float32),
            ),
        )
        rows = [("reconstruction", rec.examples), ("start", start)]
        if truth is not None and found is not None:
            pick = torch.as_tensor(found.assignment)
            rows = [
                ("original", truth),
                ("reconstruction", rec.examples[pick]),
                ("start", start[pick]),
            ]
        owner.write_bytes("reconstruction.png", grid_png(rows))
