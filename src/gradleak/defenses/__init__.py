"""Defences: update filters applied on the client before its update leaves it."""

from typing import Annotated

from pydantic import Field

from gradleak.defenses.base import DefenseConfig
from gradleak.defenses.compress import Prune, Quantize
from gradleak.defenses.dp import DPGaussian
from gradleak.defenses.noise import AdaptiveGaussian, GaussianNoise, LaplaceNoise

Defense = Annotated[
    AdaptiveGaussian | GaussianNoise | LaplaceNoise | DPGaussian | Prune | Quantize,
    Field(discriminator="name"),
]

__all__ = [
    "AdaptiveGaussian",
    "DPGaussian",
    "Defense",
    "DefenseConfig",
    "GaussianNoise",
    "LaplaceNoise",
    "Prune",
    "Quantize",
]
