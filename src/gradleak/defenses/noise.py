"""Noise on the update: adaptive Gaussian (NVFlare's GaussianPrivacy), its per-group variant,
Gaussian, Laplace.

None of these gives a differential-privacy guarantee: the scale is not tied to a bounded
sensitivity (use ``dp-gaussian`` for that). They blur what an attack can match, at a cost in
accuracy that the sweep measures. Each tells the server its scales (``fl.knowledge.Noised``), so
the audit's adaptive attacks weigh what they match by them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from gradleak.defenses.base import (
    GROUPS,
    DefenseConfig,
    fields,
    float_buffers,
    generator,
    group_fields,
    parameter_groups,
    trained,
    with_delta,
)
from gradleak.fl.filters import FilterContext, Filtered
from gradleak.fl.knowledge import Noised
from gradleak.fl.update import ClientUpdate


def adaptive_sigma(values: list[torch.Tensor], sigma0: float, percentile: float) -> float:
    """``sigma0`` x the ``percentile``-th percentile of the absolute non-zero values (0 if none)."""
    flat = torch.cat([v.detach().double().abs().flatten() for v in values]).numpy()
    nz = flat[flat != 0]
    return float(sigma0 * np.percentile(nz, percentile)) if nz.size else 0.0


def noised(
    update: ClientUpdate, scales: dict[str, float], kind: str, gen: torch.Generator
) -> ClientUpdate:
    """The update with independent noise on each named tensor at its scale (Gaussian std or
    Laplace b), drawn from ``gen`` in the order of ``scales``; tensors of scale 0 are left as they
    are (and draw nothing)."""
    changes = {}
    for k, scale in scales.items():
        if scale == 0.0:
            continue
        v = update.delta[k]
        if kind == "gaussian":
            noise = torch.randn(v.shape, generator=gen, dtype=torch.float64) * scale
        else:  # Laplace by inverse CDF of uniform draws, from the same seeded stream
            u = torch.rand(v.shape, generator=gen, dtype=torch.float64) - 0.5
            noise = -scale * torch.sign(u) * torch.log1p(-2 * u.abs())
        changes[k] = (v.double() + noise).to(v.dtype)
    return with_delta(update, changes)


@dataclass(frozen=True)
class _NoiseFilter:
    """Noise on the update, one mechanism for every noise defence: a fixed ``scale``, or (None)
    ``sigma0`` x a percentile of |values|, over the whole update or, with ``groups`` (group ->
    multiplier), per parameter group (``defenses.base.parameter_groups``)."""

    index: int
    kind: str  # gaussian or laplace
    scale: float | None  # fixed scale; None: adaptive
    sigma0: float = 0.0
    percentile: float = 95.0
    include_buffers: bool = False
    groups: tuple[tuple[str, float], ...] | None = None

    def _scales(self, update: ClientUpdate) -> tuple[dict[str, float], dict[str, object]]:
        """(the scale of every noised tensor, the row's fields)."""
        if self.groups is not None:
            group_of = parameter_groups(update)
            multiplier = dict(self.groups)
            per_group = {}
            for g in GROUPS:
                members = [update.delta[k] for k, gk in group_of.items() if gk == g]
                sigma = adaptive_sigma(members, self.sigma0, self.percentile) if members else 0.0
                per_group[g] = sigma * multiplier.get(g, 1.0)
            scales = {k: per_group[g] for k, g in group_of.items()}
            return scales, group_fields(self.index, "noise_scale", per_group)
        names = trained(update) + (float_buffers(update) if self.include_buffers else [])
        scale = self.scale
        if scale is None:
            scale = adaptive_sigma([update.delta[k] for k in names], self.sigma0, self.percentile)
        return {k: scale for k in names}, fields(self.index, noise_scale=scale)

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> Filtered:
        scales, found = self._scales(update)
        if not any(scales.values()):
            return Filtered(update, found)
        out = noised(update, scales, self.kind, generator(ctx, self.index))
        known = Noised(self.kind, tuple((k, s) for k, s in scales.items() if s))
        return Filtered(out, found, known=(known,))


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


class GroupGaussian(DefenseConfig):
    """Gaussian noise, sigma0 x each parameter group's own percentile of |values| x its multiplier.

    For group g, sigma_g = sigma0 x the percentile of g's own absolute non-zero values x g's
    multiplier (``groups``), so that a group whose values are large (a batch-norm ResNet's running
    statistics move 30 to 130 times more than its weights) is not left almost clean by a scale the
    others set. Groups: ``weights``, ``bn-affine`` (batch-norm weight and bias), ``bn-stats``
    (running mean and variance), ``classifier`` (the last linear layer: the last two-dimensional
    parameter and its bias); integer counters are never noised.

    Guarantees nothing formal (no bounded sensitivity, no accounting); each group's noise is
    relative to that group's own size, so sigma0 means the same signal-to-noise ratio in every
    group (before the multipliers). Each group's scale is reported as ``noise_scale_GROUP``."""

    name: Literal["group-gaussian"] = "group-gaussian"
    sigma0: float = Field(ge=0, description="Multiplier of each group's percentile; 0: no noise.")
    percentile: float = Field(
        95.0, gt=0, le=100, description="Which percentile of each group's |values|."
    )
    groups: dict[Literal["weights", "bn-affine", "bn-stats", "classifier"], float] = Field(
        default_factory=dict,
        description="Multiplier of each group's scale (weights, bn-affine, bn-stats, "
        "classifier; 1 where not given, 0 leaves the group clean).",
    )

    @field_validator("groups")
    @classmethod
    def _non_negative(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [g for g, m in v.items() if not m >= 0]
        if bad:
            raise ValueError(f"the multiplier of {bad[0]} must be >= 0")
        return v

    def build(self, *, index: int, sample_rate: float) -> _NoiseFilter:
        multipliers = tuple((g, float(self.groups.get(g, 1.0))) for g in GROUPS)
        return _NoiseFilter(
            index, "gaussian", None, self.sigma0, self.percentile, groups=multipliers
        )
