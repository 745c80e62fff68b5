"""Data sources: each is a validated config section (chosen by its ``source`` key) that loads
itself into a ``DataBundle``. Modalities register theirs in ``SOURCES``; the experiment schema's
``data:`` is the tagged union of every registered source."""

from __future__ import annotations

from typing import ClassVar

from gradleak.data.dataset import DataBundle
from gradleak.registry import Registry
from gradleak.schema import Section


class SourceConfig(Section):
    """A data source as written in the config's ``data:`` section; ``kind`` is the data kind of its
    examples (its modality's ``InputSpec.kind``)."""

    kind: ClassVar[str]

    def load(self, seed: int) -> DataBundle:
        """Read the source and return its training pool and test split."""
        raise NotImplementedError


SOURCES: Registry[type[SourceConfig]] = Registry("data source")

__all__ = ["SOURCES", "SourceConfig"]
