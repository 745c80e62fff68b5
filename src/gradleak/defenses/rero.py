"""Reconstruction robustness (ReRo): the most any reconstruction attack can succeed against the
(sampled) Gaussian mechanism, given how often it would succeed without seeing the output.

An attack that, not seeing the output, recovers the target with probability at most ``kappa`` (its
prior: 1/n when the target is one of n equally likely candidates) succeeds, seeing it, with
probability at most the power of the best test at level ``kappa`` between the output distributions
without the target (P) and with it (Q):

    gamma(kappa) = sup { Q(E) : P(E) <= kappa }

(Hayes, Mahloujifar and Balle, "Bounding Training Data Reconstruction in DP-SGD", NeurIPS 2023;
Kaissis, Hayes, Ziller and Rueckert, "Bounding data reconstruction attacks with the hypothesis
testing interpretation of differential privacy", 2023). For ``steps`` releases, each clipped to
norm 1 with N(0, z^2) noise and taking the target with probability q, the pair is
P = N(0, z^2)^T and Q = ((1-q) N(0, z^2) + q N(1, z^2))^T (a worst case: the noise is isotropic,
so only the component along the target's clipped contribution matters).

With q = 1 the bound is exact and closed: Phi(Phi^-1(kappa) + sqrt(T)/z). With q < 1 it is the
smaller of two upper bounds: the privacy-loss distribution composed numerically (Opacus's PRV
discretisation, Gopi et al. 2021), whose error guarantee is added to the result, and Balle et al.'s
RDP bound (S&P 2022), a looser closed form that needs no grid. Both are safe: never below the exact
value (the first within Gopi et al.'s error guarantee, as Opacus computes the grid's range). Where
its grid fits (eps_error <= 0.01), the first is at most the exact bound at a prior of
kappa x e^(2 eps_error), plus 2 DELTA_ERROR: about 2% (relative) above the exact value at most.
Results are cached: a run asks for the same few settings again and again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from opacus.accountants.analysis.prv import (
    Domain,
    PoissonSubsampledGaussianPRV,
    TruncatedPrivacyRandomVariable,
    compose_heterogeneous,
    discretize,
)
from opacus.accountants.analysis.rdp import compute_rdp
from scipy.fft import next_fast_len
from scipy.special import ndtr, ndtri

# Slack of the numerical composition (Gopi et al.'s guarantee): the composed privacy loss's delta
# at epsilon is within DELTA_ERROR of the exact one at epsilon -/+ the grid's eps_error.
EPS_ERROR = 0.01
DELTA_ERROR = 1e-9
# The grid has about POINTS points, more (up to MAX_POINTS) where eps_error would exceed EPS_ERROR,
# fewer where it would be finer than FINEST_EPS_ERROR. Past MAX_EPS_ERROR, or a loss range the grid
# cannot hold, only the RDP bound is used.
POINTS = 1 << 18
MAX_POINTS = 1 << 20
FINEST_EPS_ERROR = 0.001
MAX_EPS_ERROR = 0.2
MAX_LOSS = 500.0
# Renyi orders of the RDP bound and of the grid's range: whole numbers only, which Opacus computes
# in a fixed number of terms (fractional orders take a series as long as z^2).
ORDERS = (*range(2, 65), 80, 96, 128, 192, 256)


def rero_bound(noise_multiplier: float, sample_rate: float, steps: int, kappa: float) -> float:
    """The most any reconstruction attack succeeds after ``steps`` Gaussian mechanisms of
    ``noise_multiplier``, each taking the target with probability ``sample_rate``, when it succeeds
    with probability ``kappa`` without the output.

    Exact at ``sample_rate`` 1 (closed form), a safe upper bound below it (see the module).

    Args:
        noise_multiplier: noise std over the L2 sensitivity; 0: no noise.
        sample_rate: probability that a release includes the target, in [0, 1].
        steps: number of releases (composed).
        kappa: the attack's prior success probability, in [0, 1].
    """
    z, q, t, k = _checked(noise_multiplier, sample_rate, steps, kappa)
    if t == 0 or q == 0 or math.isinf(z) or k in (0.0, 1.0) and z > 0:
        return k
    if z == 0:  # the target's contribution is seen whenever it is taken
        return 1.0 - (1.0 - q) ** t * (1.0 - k)
    if q == 1:
        return float(ndtr(ndtri(k) + math.sqrt(t) / z))
    return _sampled(z, q, t, k)


def rdp_rero_bound(noise_multiplier: float, sample_rate: float, steps: int, kappa: float) -> float:
    """Balle et al.'s ReRo bound from Renyi DP (S&P 2022): min over orders a of
    (kappa x e^eps_a)^((a-1)/a), eps_a from Opacus's RDP of the sampled Gaussian. Safe, looser than
    ``rero_bound``."""
    z, q, t, k = _checked(noise_multiplier, sample_rate, steps, kappa)
    if t == 0 or q == 0 or math.isinf(z) or k in (0.0, 1.0):
        return k
    if z == 0:
        return 1.0
    a = np.asarray(ORDERS, dtype=float)
    log_gamma = (a - 1) / a * (math.log(k) + t * _rdp_step(z, q))
    return float(math.exp(min(0.0, float(np.min(log_gamma)))))


@lru_cache(maxsize=256)
def _rdp_step(z: float, q: float) -> np.ndarray:
    """Renyi divergences D_a(Q || P) of one step at ORDERS (Opacus's sampled-Gaussian RDP)."""
    rdp = np.atleast_1d(compute_rdp(q=q, noise_multiplier=z, steps=1, orders=list(ORDERS)))
    rdp.setflags(write=False)
    return rdp


def _half_width(z: float, q: float, t: int) -> float:
    """The grid's half-range: Gopi et al.'s safe domain (their Remark 5.6, computed as Opacus's
    PRV accountant does), past which the composed loss lies with probability about DELTA_ERROR."""
    a = np.asarray(ORDERS, dtype=float)
    rdp = _rdp_step(z, q)

    def eps(rdp: np.ndarray, delta: float) -> float:  # RDP to (eps, delta), Opacus's conversion
        return float(np.min(rdp - (math.log(delta) + np.log(a)) / (a - 1) + np.log((a - 1) / a)))

    return max(eps(t * rdp, DELTA_ERROR / 4), eps(rdp, DELTA_ERROR / (8 * t)), MAX_EPS_ERROR) + 3


def _checked(z: float, q: float, t: int, k: float) -> tuple[float, float, int, float]:
    if not (z >= 0) or not (0 <= q <= 1) or not (0 <= k <= 1):
        raise ValueError(
            f"need noise_multiplier >= 0, sample_rate and kappa in [0, 1]: got {z}, {q}, {k}"
        )
    if isinstance(t, bool) or int(t) != t or t < 0:
        raise ValueError(f"steps must be a whole number >= 0, got {t!r}")
    return float(z), float(q), int(t), float(k)


@lru_cache(maxsize=4096)
def _sampled(z: float, q: float, t: int, k: float) -> float:
    """The sampled mechanism's bound: the tighter of the numerical and the RDP one, never below
    kappa (no bound is: the test that ignores the output has power kappa)."""
    bound = rdp_rero_bound(z, q, t, k)
    numerical = _numerical(z, q, t, k)
    if numerical is not None:
        bound = min(bound, numerical)
    return max(k, bound)


def _numerical(z: float, q: float, t: int, k: float) -> float | None:
    """An upper bound on gamma(k) from the composed privacy-loss distributions, or None when the
    grid they need is too coarse or too large.

    gamma(k) = inf over e of delta(e) + e^e k, where delta(e) = sup_E Q(E) - e^e P(E) (at the
    optimal test's threshold both sides are equal). For e >= 0, delta is the composed loss
    log(Q/P) under Q; for e < 0, delta(e) = 1 - e^e + e^e delta'(-e), delta' being that of (P, Q):
    the loss log(P/Q) under P. Each side is composed on a grid with error eps_error in epsilon and
    DELTA_ERROR in delta, both charged to the bound, so every candidate is an upper bound.
    """
    half = _half_width(z, q, t)
    if not half < MAX_LOSS:
        return None
    spread = math.sqrt(t * math.log(12 / DELTA_ERROR) / 2)  # eps_error = mesh x spread
    mesh = min(2 * half / POINTS, max(EPS_ERROR / spread, 2 * half / MAX_POINTS))
    mesh = max(mesh, FINEST_EPS_ERROR / spread)
    eps_error = mesh * spread
    if eps_error > MAX_EPS_ERROR:
        return None
    domain = _grid(half, mesh)
    curve = _delta_curve(PoissonSubsampledGaussianPRV(q, z), domain, t)
    if curve is None:
        return None
    e, delta = curve
    candidates = delta + np.exp(e + eps_error) * k
    best = float(candidates.min()) + DELTA_ERROR
    if int(candidates.argmin()) == 0:  # the optimum may lie at e < 0: look there too
        curve = _delta_curve(_RemovalLoss(q, z), domain, t)
        if curve is not None:
            s, removal = (
                curve  # delta'(s + eps_error) <= removal + DELTA_ERROR; e = -(s + eps_error)
            )
            scale = np.exp(-(s + eps_error))
            best = min(best, float(np.min(1 - scale * (1 - k - removal - DELTA_ERROR))))
    return min(1.0, best)


def _grid(half: float, mesh: float) -> Domain:
    """A grid of spacing ``mesh`` over [-half, half] with 0 on it and an even, FFT-friendly size
    (Opacus's composition assumes the size even and 0 at index size/2 - 1)."""
    n = 2 * next_fast_len(math.ceil(half / mesh) + 1, real=True)
    return Domain(-(n // 2 - 1) * mesh, n // 2 * mesh, n)


def _delta_curve(prv, domain: Domain, t: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The grid's points e >= 0 and delta(e) of ``t`` compositions of ``prv`` (its privacy loss
    under the distribution it is drawn from), plus the FFT's rounding noise; None when Opacus
    refuses the discretisation."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore", under="ignore"):
        try:
            trunc = TruncatedPrivacyRandomVariable(prv, domain.t_min, domain.t_max)
            composed = compose_heterogeneous([discretize(trunc, domain)], [t])
        except (RuntimeError, ValueError, OverflowError):
            return None
    e, p = composed.domain.ts, composed.pmf
    keep = e >= 0
    if not keep.any():
        return None
    # delta(e_i) = sum over j >= i of p_j (1 - e^(e_i - e_j)): tail sums from the top.
    tail = np.cumsum(p[::-1])[::-1]
    weighted = np.cumsum((p * np.exp(-e))[::-1])[::-1]
    delta = tail - np.exp(e) * weighted
    noise = len(p) * max(0.0, -float(p.min()))  # negative masses: the FFT's rounding, bounded
    return e[keep], np.maximum(delta[keep], 0.0) + noise


@dataclass(frozen=True)
class _RemovalLoss:
    """The privacy loss log(P/Q) at an output drawn from P = N(0, z^2), Q the mixture
    (1-q) N(0, z^2) + q N(1, z^2): never above -log(1-q). Only its CDF is used."""

    sample_rate: float
    noise_multiplier: float

    def cdf(self, s):
        q, z = self.sample_rate, self.noise_multiplier
        s = np.asarray(s, dtype=float)
        top = -math.log1p(-q)
        # log(P/Q)(x) <= s  <=>  x >= z^2 log((e^-s - (1-q)) / q) + 1/2
        ratio = (np.exp(-np.minimum(s, top)) - (1 - q)) / q
        x = z * z * np.log(np.maximum(ratio, 1e-300)) + 0.5
        return np.where(s >= top, 1.0, ndtr(-x / z))
