"""In-memory datasets of any modality, and what a data source yields.

A ``Dataset`` holds examples (a tensor whose first axis runs over the examples: images float32
N x C x H x W in [0, 1], token ids int64 N x L) and one integer target per example (a class label;
for a causal language model, which learns the examples themselves, a category such as the
sentence's kind, used to split and skew the clients). How examples are fed to a model, compared and
shown is the modality's ``InputSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from gradleak.seeding import numpy_rng

if TYPE_CHECKING:  # the protocol refers to datasets too: annotations only, no import cycle
    from gradleak.modality import InputSpec


@dataclass(frozen=True)
class Dataset:
    """Examples and one integer target each, held in memory."""

    examples: torch.Tensor
    targets: torch.Tensor  # int64, N

    def __post_init__(self) -> None:
        if self.targets.ndim != 1:
            raise ValueError(
                f"targets must be one integer per example, got shape {tuple(self.targets.shape)}"
            )
        if len(self.examples) != len(self.targets):
            raise ValueError(f"{len(self.examples)} examples but {len(self.targets)} targets")

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: np.ndarray | torch.Tensor | list[int]) -> Dataset:
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Dataset(self.examples[idx].contiguous(), self.targets[idx].contiguous())


@dataclass(frozen=True)
class DataBundle:
    """What a data source yields: a training pool for the clients, a held-out test split, the
    input spec of its examples and the task it is for."""

    name: str
    train: Dataset
    test: Dataset
    classes: tuple[str, ...]
    spec: InputSpec
    task: str = "classification"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
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
