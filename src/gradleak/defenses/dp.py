"""Client-level differential privacy: clip the update, add calibrated Gaussian noise, account.

Guarantee: (epsilon, delta)-DP for each client's whole contribution (neighbouring federations
differ by one client's data), from Opacus's RDP accountant, for the updates that client has sent so
far. Each round a client takes part is one Gaussian mechanism with noise multiplier z on an update
of L2 sensitivity ``clip``; with ``clients_per_round`` < 1 the accountant assumes Poisson sampling
at that rate, while the simulator draws a fixed number of clients, so epsilon is then an estimate.
Batch-norm running statistics are data-dependent and cannot be clipped meaningfully: their deltas
are zeroed (the client sends no buffer change), so no statistic leaks outside the accounted noise.

Next to epsilon, each row carries the reconstruction-robustness bound (``rero.rero_bound``): the
most any attack on the client's updates so far succeeds, given its success rate ``rero_kappa``
without them. It is computed for the server, the adversary the audit plays: it sees every update
the client sent and knows when the client took part, so sampling amplifies nothing there (q = 1,
one Gaussian mechanism of sensitivity ``clip`` per round taken part in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from opacus.accountants import RDPAccountant
from pydantic import Field

from gradleak.defenses.base import (
    DefenseConfig,
    fields,
    float_buffers,
    generator,
    trained,
    with_delta,
)
from gradleak.defenses.rero import rero_bound
from gradleak.fl.filters import FilterContext, Filtered
from gradleak.fl.knowledge import Noised, StatisticsWithheld
from gradleak.fl.update import ClientUpdate


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon after ``steps`` Gaussian mechanisms, from Opacus's RDP accountant."""
    if noise_multiplier == 0:
        return math.inf
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@dataclass(frozen=True)
class _DPFilter:
    index: int
    clip: float
    noise_multiplier: float
    delta: float
    sample_rate: float
    rero_kappa: float

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> Filtered:
        names = trained(update)
        norm = math.sqrt(math.fsum(float(update.delta[k].double().pow(2).sum()) for k in names))
        factor = min(1.0, self.clip / norm) if norm > 0 else 1.0
        gen = generator(ctx, self.index)
        std = self.noise_multiplier * self.clip
        changes = {}
        for k in names:
            v = update.delta[k].double() * factor
            if std:
                v = v + std * torch.randn(v.shape, generator=gen, dtype=torch.float64)
            changes[k] = v.to(update.delta[k].dtype)
        for k in update.buffers:
            changes[k] = torch.zeros_like(update.delta[k])
        eps = epsilon(self.noise_multiplier, self.sample_rate, ctx.participation, self.delta)
        # The server sees each update and who sent it: no amplification by sampling (q = 1).
        rero = rero_bound(self.noise_multiplier, 1.0, ctx.participation, self.rero_kappa)
        found = fields(
            self.index,
            dp_epsilon=eps,
            dp_rero_bound=rero,
            dp_rero_kappa=self.rero_kappa,
            dp_delta=self.delta,
            dp_norm_before_clip=norm,
            dp_clip_factor=factor,
        )
        known = (
            Noised("gaussian", tuple((k, std) for k in names)) if std else None,
            StatisticsWithheld(tuple(float_buffers(update)), "zeroed"),
        )
        return Filtered(with_delta(update, changes), found, known=tuple(k for k in known if k))


class DPGaussian(DefenseConfig):
    """Clip the update's L2 norm to ``clip``, add N(0, (noise_multiplier x clip)^2) per
    coordinate, zero batch-norm buffer deltas, and report each client's (epsilon, delta) and the
    bound on any reconstruction attack's success (ReRo)."""

    name: Literal["dp-gaussian"] = "dp-gaussian"
    clip: float = Field(gt=0, description="L2 bound of a client's update (its sensitivity).")
    noise_multiplier: float = Field(
        ge=0, description="Noise std in units of clip; 0: clipping only (epsilon inf)."
    )
    delta: float = Field(
        1e-5, gt=0, lt=1, description="The delta of the reported (epsilon, delta)."
    )
    rero_kappa: float = Field(
        0.1,
        gt=0,
        lt=1,
        description=(
            "The prior of the reported reconstruction bound (dp_rero_bound): how often an attack "
            "succeeds without the updates, 1/n when the client's data is one of n equally likely "
            "candidates (0.1: an informed attacker choosing among ten)."
        ),
    )

    def build(self, *, index: int, sample_rate: float) -> _DPFilter:
        return _DPFilter(
            index, self.clip, self.noise_multiplier, self.delta, sample_rate, self.rero_kappa
        )
