"""Splitting a training pool into clients: explicit sizes, IID, or Dirichlet label skew.

The same seed gives the same split. Client ids start at 1, as in the papers' tables.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

import numpy as np
from pydantic import Field

from gradleak.data.dataset import Dataset
from gradleak.errors import ConfigError
from gradleak.schema import Section
from gradleak.seeding import numpy_rng


@dataclass(frozen=True)
class ClientData:
    """One client's private training data and its local-training settings."""

    client_id: int
    data: Dataset
    batch_size: int
    lr: float | None = None  # None: the experiment's training.lr


class ClientSpec(Section):
    """One row of an explicit partition table."""

    size: int = Field(gt=0, description="Number of training examples of this client.")
    batch_size: int = Field(gt=0, description="Local mini-batch size.")
    lr: float | None = Field(None, gt=0, description="Local learning rate; null = training.lr.")
    classes: list[int] | None = Field(
        None,
        min_length=1,
        description="Draw this client's examples only from these classes (label "
        "skew by hand); null = any class.",
    )


class _Partition(Section):
    def check(self, pool_size: int) -> None:
        """Raise ConfigError when the pool cannot serve this partition."""

    def split(self, pool: Dataset, seed: int) -> list[ClientData]:
        raise NotImplementedError

    @property
    def num_clients(self) -> int:
        raise NotImplementedError


class ExplicitPartition(_Partition):
    """A table of clients, each with its own number of images and batch size."""

    scheme: Literal["explicit"] = "explicit"
    clients: list[ClientSpec] = Field(
        min_length=1, description="One entry per client, in id order."
    )

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def check(self, pool_size: int) -> None:
        need = sum(c.size for c in self.clients)
        if need > pool_size:
            raise ConfigError(
                "partition.clients",
                f"the clients ask for {need} training images but the data source has {pool_size}",
            )
        for i, c in enumerate(self.clients):
            if c.batch_size > c.size:
                raise ConfigError(
                    f"partition.clients.{i}.batch_size",
                    f"batch size {c.batch_size} is larger than the client's {c.size} images",
                )

    def split(self, pool: Dataset, seed: int) -> list[ClientData]:
        self.check(len(pool))
        order = numpy_rng(seed, "partition").permutation(len(pool))
        labels, used, out = pool.targets.numpy(), np.zeros(len(pool), dtype=bool), []
        for i, c in enumerate(self.clients):
            free = order[~used[order]]  # unused images, in the seeded order
            if c.classes is not None:
                free = free[np.isin(labels[free], c.classes)]
            if len(free) < c.size:
                raise ConfigError(
                    f"partition.clients.{i}.size",
                    f"{c.size} images asked for, but only {len(free)} unused ones of classes "
                    f"{c.classes} are left",
                )
            pick = free[: c.size]
            used[pick] = True
            out.append(ClientData(i + 1, pool.subset(np.sort(pick)), c.batch_size, c.lr))
        return out


class _Equal(_Partition):
    clients: int = Field(gt=0, description="Number of clients.")
    batch_size: int = Field(8, gt=0, description="Local mini-batch size of every client.")

    @property
    def num_clients(self) -> int:
        return self.clients

    def check(self, pool_size: int) -> None:
        if self.clients > pool_size:
            raise ConfigError(
                "partition.clients", f"{self.clients} clients but only {pool_size} training images"
            )


class IIDPartition(_Equal):
    """The pool shuffled and dealt out in (nearly) equal shares."""

    scheme: Literal["iid"] = "iid"
    samples_per_client: int | None = Field(
        None, gt=0, description="Images per client; null shares out the whole pool."
    )

    def check(self, pool_size: int) -> None:
        super().check(pool_size)
        if self.samples_per_client and self.samples_per_client * self.clients > pool_size:
            raise ConfigError(
                "partition.samples_per_client",
                f"{self.clients} x {self.samples_per_client} images exceed the pool of {pool_size}",
            )

    def split(self, pool: Dataset, seed: int) -> list[ClientData]:
        self.check(len(pool))
        order = numpy_rng(seed, "partition").permutation(len(pool))
        if self.samples_per_client:
            order = order[: self.samples_per_client * self.clients]
        return [
            ClientData(i + 1, pool.subset(np.sort(part)), self.batch_size)
            for i, part in enumerate(np.array_split(order, self.clients))
        ]


class DirichletPartition(_Equal):
    """Label skew: each class is split across clients by proportions drawn from Dir(alpha)."""

    scheme: Literal["dirichlet"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Concentration; small values give strong skew.")

    def split(self, pool: Dataset, seed: int) -> list[ClientData]:
        self.check(len(pool))
        rng = numpy_rng(seed, "partition")
        labels = pool.targets.numpy()
        for _ in range(100):  # redraw until every client has at least one image
            parts: list[list[int]] = [[] for _ in range(self.clients)]
            for c in np.unique(labels):
                idx = rng.permutation(np.flatnonzero(labels == c))
                cuts = np.cumsum(rng.dirichlet([self.alpha] * self.clients))[:-1] * len(idx)
                for k, chunk in enumerate(np.split(idx, cuts.astype(int))):
                    parts[k].extend(chunk.tolist())
            if all(parts):
                return [
                    ClientData(k + 1, pool.subset(np.sort(p)), self.batch_size)
                    for k, p in enumerate(parts)
                ]
        raise ConfigError(
            "partition.alpha",
            f"alpha={self.alpha} leaves some client empty; raise alpha or the pool",
        )


Partition = Annotated[
    ExplicitPartition | IIDPartition | DirichletPartition, Field(discriminator="scheme")
]
