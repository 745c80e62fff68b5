"""Data of any modality: in-memory datasets, client partitions, and the registry of sources."""

from gradleak.data.dataset import DataBundle, Dataset
from gradleak.data.partition import ClientData, ClientSpec, Partition
from gradleak.data.sources import SOURCES, SourceConfig

__all__ = [
    "SOURCES",
    "ClientData",
    "ClientSpec",
    "DataBundle",
    "Dataset",
    "Partition",
    "SourceConfig",
]
