"""Data: bundled real sets, user formats, and client partitions."""

from gradleak.data.dataset import DataBundle, ImageDataset, denormalize, normalize
from gradleak.data.partition import ClientData, ClientSpec, Partition
from gradleak.data.sources import DataSource

__all__ = [
    "ClientData",
    "ClientSpec",
    "DataBundle",
    "DataSource",
    "ImageDataset",
    "Partition",
    "denormalize",
    "normalize",
]
