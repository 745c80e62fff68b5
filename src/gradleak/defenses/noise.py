"""Noise on the update: adaptive Gaussian (NVFlare's GaussianPrivacy), Gaussian, Laplace.

None of these gives a differential-privacy guarantee: the scale is not tied to a bounded
sensitivity (use ``dp-gaussian`` for that). They blur what an attack can match, at a cost in
accuracy that the sweep measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from gradleak.defenses.base import (
    DefenseConfig,
    fields,
    float_buffers,
    generator,
    trained,
    with_delta,
)
from gradleak.fl.filters import FilterContext, Filtered
from gradleak.fl.update import ClientUpdate


def adaptive_sigma(values: list[torch.Tensor], sigma0: float, percentile: float) -> float:
    """``sigma0`` x the ``percentile``-th percentile of the absolute non-zero values (0 if none)."""
    flat = torch.cat([v.detach().double().abs().flatten() for v in values]).numpy()
    nz = flat[flat != 0]
    return float(sigma0 * np.percentile(nz, percentile)) if nz.size else 0.0


@dataclass(frozen=True)
class _NoiseFilter:
    index: int
    kind: str  # gaussian or laplace
    scale: float | None  # fixed scale; None: adaptive
    sigma0: float = 0.0
    percentile: float = 95.0
    include_buffers: bool = False

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> Filtered:
        names = trained(update) + (float_buffers(update) if self.include_buffers else [])
        scale = self.scale
        if scale is None:
            scale = adaptive_sigma([update.delta[k] for k in names], self.sigma0, self.percentile)
        found = fields(self.index, noise_scale=scale)
        if scale == 0.0:
            return Filtered(update, found)
        gen = generator(ctx, self.index)
        changes = {}
        for k in names:
            v = update.delta[k]
            if self.kind == "gaussian":
                noise = torch.randn(v.shape, generator=gen, dtype=torch.float64) * scale
            else:  # Laplace by inverse CDF of uniform draws, from the same seeded stream
                u = torch.rand(v.shape, generator=gen, dtype=torch.float64) - 0.5
                noise = -scale * torch.sign(u) * torch.log1p(-2 * u.abs())
            changes[k] = (v.double() + noise).to(v.dtype)
        return Filtered(with_delta(update, changes), found)


class AdaptiveGaussian(DefenseConfig):
    """Gaussian noise with sigma = sigma0 x the percentile of the update's absolute non-zero
    values (one sigma for the whole update), as NVFlare's GaussianPrivacy filter. Parameters only
    by default; batch-norm running statistics with ``include_buffers``; counters never."""

    name: Literal["adaptive-gaussian"] = "adaptive-gaussian"
    sigma0: float = Field(ge=0, description="Multiplier of the percentile; 0 adds no noise.")
    percentile: float = Field(95.0, gt=0, le=100, description="Which percentile of |values|.")
    include_buffers: bool = Field(False, description="Also noise batch-norm running statistics.")

    def build(self, *, index: int, sample_rate: float) -> _NoiseFilter:
        return _NoiseFilter(
            index, "gaussian", None, self.sigma0, self.percentile, self.include_buffers
        )


class GaussianNoise(DefenseConfig):
    """Gaussian noise of a fixed standard deviation on every parameter of the update."""

    name: Literal["gaussian"] = "gaussian"
    sigma: float = Field(ge=0, description="Standard deviation of the noise.")
    include_buffers: bool = Field(False, description="Also noise batch-norm running statistics.")

    def build(self, *, index: int, sample_rate: float) -> _NoiseFilter:
        return _NoiseFilter(index, "gaussian", self.sigma, include_buffers=self.include_buffers)


class LaplaceNoise(DefenseConfig):
    """Laplace noise of a fixed scale b (std b*sqrt(2)) on every parameter of the update."""

    name: Literal["laplace"] = "laplace"
    scale: float = Field(ge=0, description="Scale b of the Laplace distribution.")
    include_buffers: bool = Field(False, description="Also noise batch-norm running statistics.")

    def build(self, *, index: int, sample_rate: float) -> _NoiseFilter:
        return _NoiseFilter(index, "laplace", self.scale, include_buffers=self.include_buffers)
