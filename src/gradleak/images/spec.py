"""The image modality's input spec: C x H x W pixels in [0, 1], normalised per channel for the
model, compared by SSIM, PSNR and MSE, paired by pixel error (shown as PNG grids: ``render``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from gradleak.data.dataset import Dataset
from gradleak.errors import ConfigError
from gradleak.images.data import normalize
from gradleak.images.metrics import METRICS, distances
from gradleak.modality import Metric


@dataclass(frozen=True)
class ImageSpec:
    """Images of ``shape`` (channels, height, width), normalised with per-channel ``mean`` and
    ``std`` (the client's input pipeline, which the server knows)."""

    kind: ClassVar[str] = "image"
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    metrics: dict[str, Metric] = field(
        default_factory=lambda: dict(METRICS), compare=False, repr=False
    )

    def __post_init__(self) -> None:
        c = self.shape[0]
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(
                f"mean and std need {c} values for {c}-channel images (got {len(self.mean)} and "
                f"{len(self.std)})"
            )
        if not all(s > 0 for s in self.std):
            raise ValueError("std values must be positive (each channel is divided by its std)")

    @classmethod
    def square(cls, channels: int, size: int, mean: float = 0.5, std: float = 0.25) -> ImageSpec:
        """Square images normalised alike on every channel (tests, benchmarks, quick use)."""
        return cls((channels, size, size), (mean,) * channels, (std,) * channels)

    def model_inputs(self, examples: torch.Tensor) -> torch.Tensor:
        return normalize(examples, self.mean, self.std)

    def cost(self, recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
        return distances(recon, truth)

    def factory_args(self) -> dict[str, Any]:
        return {"channels": self.shape[0], "image_size": self.shape[1]}

    def blank(self, n: int) -> torch.Tensor:
        return torch.zeros(n, *self.shape)

    PRIORS: ClassVar[tuple[str, ...]] = ("mean-image", "none")

    def prior(self, name: str, public: Dataset) -> torch.Tensor:
        """mean-image: the mean of the public (test) images; none: the dataset's mean colour."""
        if name == "mean-image":
            return public.examples.mean(0, keepdim=True)
        if name == "none":
            return (
                torch.tensor(self.mean, dtype=torch.float32)
                .view(1, -1, 1, 1)
                .expand(1, -1, *self.shape[1:])
                .clone()
            )
        raise ConfigError(
            "audit.prior", f"{name!r} is not a prior of images (one of {', '.join(self.PRIORS)})"
        )
