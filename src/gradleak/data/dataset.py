"""In-memory image datasets: images as float32 N x C x H x W in [0, 1], integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from gradleak.seeding import numpy_rng


@dataclass(frozen=True)
class ImageDataset:
    """A labelled set of images held in memory.

    Images stay in [0, 1]; normalisation (``DataBundle.mean``/``std``) is applied by whoever feeds a
    model, so that reconstructions and metrics live in the same pixel space as the originals.
    """

    images: torch.Tensor  # float32, N x C x H x W, in [0, 1]
    labels: torch.Tensor  # int64, N

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be N x C x H x W, got shape {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> ImageDataset:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return ImageDataset(self.images[idx].contiguous(), self.labels[idx].contiguous())

    @property
    def shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)


@dataclass(frozen=True)
class DataBundle:
    """What a data source yields: a training pool for the clients and a held-out test split."""

    name: str
    train: ImageDataset
    test: ImageDataset
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of N x C x H x W images (std floored to avoid division by 0)."""
    mean = images.mean(dim=(0, 2, 3)).double()
    std = images.std(dim=(0, 2, 3)).double().clamp_min(1e-3)
    return tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """(images - mean) / std per channel; the inverse is ``denormalize``."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - m) / s


def denormalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * s + m


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of N x C x H x W images to size x size, kept in [0, 1]."""
    if images.shape[-2:] == (size, size):
        return images.contiguous()
    out = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.clamp_(0.0, 1.0).contiguous()


def set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """Convert between grayscale and RGB (ITU-R 601 luma); ``None`` keeps the native channels."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 1 and c == 3:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype).view(1, 3, 1, 1)
        return (images * w).sum(dim=1, keepdim=True)
    if channels == 3 and c == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"cannot convert {c}-channel images to {channels} channels")


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): ``fraction`` of each class held out, chosen by ``seed``."""
    rng = numpy_rng(seed, "test-split")
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        keep.append(idx[n_held:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))
