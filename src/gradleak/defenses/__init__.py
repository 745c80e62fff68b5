"""Defences: update filters applied on the client before its update leaves it."""

from typing import Annotated

from pydantic import Field

from gradleak.defenses.base import DefenseConfig
from gradleak.defenses.compress import Prune, Quantize
from gradleak.defenses.dp import DPGaussian
from gradleak.defenses.noise import AdaptiveGaussian, GaussianNoise, GroupGaussian, LaplaceNoise
from gradleak.defenses.stats import BatchNormStatsLocal

Defense = Annotated[
    AdaptiveGaussian
    | GroupGaussian
    | GaussianNoise
    | LaplaceNoise
    | DPGaussian
    | Prune
    | Quantize
    | BatchNormStatsLocal,
    Field(discriminator="name"),
]

__all__ = [
    "AdaptiveGaussian",
    "BatchNormStatsLocal",
    "DPGaussian",
    "Defense",
    "DefenseConfig",
    "GaussianNoise",
    "GroupGaussian",
    "LaplaceNoise",
    "Prune",
    "Quantize",
]
