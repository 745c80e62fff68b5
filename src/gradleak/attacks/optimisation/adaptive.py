"""What the known defences make of the engine's objective (the adaptive attacks).

The server knows the defence protocol (``ServerView.known_defenses``, Kerckhoffs), so an attack
need not take a defended update at face value (Balunović et al., "Bayesian Framework for Gradient
Leakage", ICLR 2022; Huang et al., "Evaluating Gradient Inversion Attacks and Defenses in Federated
Learning", NeurIPS 2021). From the records, in the order the filters ran:

- pruning: only the coordinates it kept (the non-zero ones received) are matched;
- quantisation: each received value stands for its cell, so only the distance outside the cell is
  penalised (the simulated update is compared with its nearest point in the cells);
- noise: each tensor's residual is weighed by the inverse of its known noise variance (the Gaussian
  likelihood; Laplace by its variance too), normalised to a mean weight of 1; the batch-norm
  statistics term weighs each layer's distances by 1 / (1 + rho^2), rho the known noise on the
  revealed statistic relative to the scale the distance is divided by, and fits the variances to
  targets clamped at 0;
- statistics withheld (``bn-stats-local``, DP): the statistics term is dropped, and an attack that
  matched nothing else matches the update instead (``settings.without_statistics``).

A record is only used while it is observable: noise added after a pruning or a quantisation hides
the zeros and the grid, so their masks and cells are dropped and the noise weighting is used
instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from gradleak.attacks.base import ServerView
from gradleak.fl.knowledge import Noised, Pruned, Quantized, StatisticsWithheld

# A tensor the defences left noise-free weighs as if its noise were this fraction of the largest
# known standard deviation (the Gaussian likelihood would weigh it infinitely).
NOISE_FLOOR = 1e-2

Weight = float | torch.Tensor


@dataclass
class Adaptation:
    """The known defences, resolved per tensor of the update as received."""

    pruned: set[str] = field(default_factory=set)
    quantized: dict[str, str] = field(default_factory=dict)  # name -> format
    noise_var: dict[str, float] = field(default_factory=dict)  # name -> variance of the noise
    withheld: str | None = None  # how the batch-norm statistics were withheld, if they were

    @classmethod
    def of(cls, view: ServerView) -> Adaptation:
        out = cls()
        for record in view.known_defenses:
            if isinstance(record, Pruned):
                out.pruned |= set(record.names)
            elif isinstance(record, Quantized):
                out.quantized.update(dict.fromkeys(record.names, record.format))
            elif isinstance(record, Noised):
                for name, std in record.stds().items():
                    out.noise_var[name] = out.noise_var.get(name, 0.0) + std * std
                    out.pruned.discard(name)  # the zeros and the grid are no longer visible
                    out.quantized.pop(name, None)
            elif isinstance(record, StatisticsWithheld):
                out.withheld = record.mode
        return out

    def changed(self) -> set[str]:
        """The tensors whose received values a defence changed (pruned, quantised or noised)."""
        noised = {n for n, v in self.noise_var.items() if v > 0}
        return self.pruned | set(self.quantized) | noised

    # -- the update-matching term ----------------------------------------------------------------
    def noise_weights(self, names: list[str], view: ServerView, power: int) -> list[float] | None:
        """Per tensor, (sigma_ref / sigma)^power, normalised to an element-weighted mean of 1;
        None when no tensor is noised or all are noised alike (the weights would all be 1)."""
        stds = [math.sqrt(self.noise_var.get(n, 0.0)) for n in names]
        top = max(stds, default=0.0)
        if top == 0.0 or len(set(stds)) == 1:
            return None
        raw = [(1.0 / max(s, NOISE_FLOOR * top)) ** power for s in stds]
        sizes = [view.update[n].numel() for n in names]
        mean = sum(w * k for w, k in zip(raw, sizes, strict=True)) / sum(sizes)
        return [w / mean for w in raw]

    def matching(
        self,
        names: list[str],
        target: list[torch.Tensor],
        weights: list[float] | None,
        view: ServerView,
        objective: str,
    ) -> tuple[list[Weight] | None, list[tuple[torch.Tensor, torch.Tensor]] | None]:
        """(the per-tensor weights, scalar or per coordinate, and the per-tensor bounds of the
        pseudo-gradient each received value stands for, or None where every value is exact)."""
        noise = self.noise_weights(names, view, 1 if objective == "l1" else 2)
        out: list[Weight] = [1.0] * len(names) if weights is None else list(weights)
        if noise is not None:
            out = [w * v for w, v in zip(out, noise, strict=True)]
        for i, n in enumerate(names):
            if n in self.pruned:
                out[i] = (view.update[n] != 0).to(target[i]) * out[i]
        bounds = None
        if any(n in self.quantized for n in names):
            lr = view.meta.lr
            bounds = []
            for n, t in zip(names, target, strict=True):
                if n not in self.quantized:
                    bounds.append((t, t))
                    continue
                lo, hi = cell(view.update[n], self.quantized[n])
                # pseudo-gradient = -delta / lr: the bounds swap
                bounds.append(((-hi / lr).to(t), (-lo / lr).to(t)))
        changed = noise is not None or bounds is not None or any(n in self.pruned for n in names)
        return (out if changed or weights is not None else None), bounds

    def changes_matching(self, names: list[str], view: ServerView) -> bool:
        """Whether the known defences change the update-matching term over ``names``."""
        return (
            any(n in self.pruned or n in self.quantized for n in names)
            or self.noise_weights(names, view, 2) is not None
        )

    # -- the batch-norm statistics term ----------------------------------------------------------
    def statistic_weights(
        self, layer: str, channels: int, keep: float, scale_mean: float, scale_var: float
    ) -> tuple[float, float]:
        """The weights of one batch-norm layer's mean and variance distances under known noise:
        1 / (1 + rho^2), rho being the norm of the noise on the revealed statistic (the buffer's
        sigma / (1 - keep) per channel, ``keep`` the share of the global statistic the client's
        steps kept) relative to the scale its distance is divided by; 1 where not noised. Only
        known quantities enter: a per-layer signal estimate from the received deltas is itself
        drowned in the noise at a few dozen channels."""
        out = []
        for buf, scale in (("running_mean", scale_mean), ("running_var", scale_var)):
            var = self.noise_var.get(f"{layer}.{buf}", 0.0)
            rho2 = var * channels / (1 - keep) ** 2 / max(scale, 1e-12) ** 2
            out.append(1.0 / (1.0 + rho2))
        return out[0], out[1]

    def statistics_usable(self) -> bool:
        """False when the batch-norm statistics were withheld."""
        return self.withheld is None

    def changes_statistics(self, view: ServerView, layers: list[str]) -> bool:
        """Whether the known defences change the statistics term (withheld, or noised)."""
        return not self.statistics_usable() or any(
            self.noise_var.get(f"{layer}.{buf}", 0.0) > 0
            for layer in layers
            for buf in ("running_mean", "running_var")
        )


def cell(received: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(lower, upper) bounds, in float64, of the values that quantise to each received value:
    int8 +- scale/2 with scale = max|received| / 127 (the largest magnitude is 127 steps); fp16
    the midpoints to the neighbouring half-precision values."""
    v = received.detach().double()
    if fmt == "int8":
        half = float(v.abs().max()) / 127 / 2
        return v - half, v + half
    h = received.detach().half()
    up = torch.nextafter(h, torch.full_like(h, math.inf)).double()
    down = torch.nextafter(h, torch.full_like(h, -math.inf)).double()
    return (v + down) / 2, (v + up) / 2
