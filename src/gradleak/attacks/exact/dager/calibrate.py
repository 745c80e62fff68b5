"""Data-driven acceptance thresholds for span distances.

True candidates sit at 1e-7..1e-5 after one FedSGD step and at 3e-3..1e-2 after several FedAvg
steps; false ones start around 5e-2. No fixed constant serves both, so each layer's threshold is
put in the widest gap (on a log scale) between the smallest distances observed at that layer, and
the width of that gap is the evidence reported as confidence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Cut", "widest_gap", "confidence_from_ratio"]

_FLOOR = 1e-12


@dataclass(frozen=True)
class Cut:
    """A threshold placed between accepted and rejected distances.

    Attributes:
        threshold: geometric mean of the last accepted and first rejected distance.
        n_accepted: how many of the pooled distances fall below it.
        ratio: first rejected / last accepted (>= 1); large means a clean separation.
    """

    threshold: float
    n_accepted: int
    ratio: float


def widest_gap(distances: Tensor, *, max_accept: int, min_accept: int = 1) -> Cut | None:
    """Place a threshold in the widest log-gap among the smallest distances.

    Args:
        distances: pooled distances of one layer (any order).
        max_accept: most candidates that can be true (for example sequences x positions); the
            gap is searched only among the ``max_accept + 1`` smallest values.
        min_accept: fewest candidates that must be accepted.

    Returns:
        The cut, or None when there are too few distances to see a gap.
    """
    d = torch.sort(distances.detach().to(torch.float64).clamp_min(_FLOOR).flatten()).values
    hi = min(max_accept, d.numel() - 1)
    if hi < min_accept:
        return None
    logs = d[: hi + 1].log()
    gaps = logs[1:] - logs[:-1]  # gaps[i]: accept i + 1 values
    gaps[: min_accept - 1] = -math.inf
    i = int(torch.argmax(gaps))
    lo_v, hi_v = float(d[i]), float(d[i + 1])
    return Cut(threshold=math.sqrt(lo_v * hi_v), n_accepted=i + 1, ratio=hi_v / lo_v)


def confidence_from_ratio(ratio: float) -> float:
    """Map a separation ratio (first rejected / last accepted) to [0, 1): 1 - 1/ratio.

    A one-step gradient gives ratios of 1e3-1e5 (confidence ~1); three FedAvg steps about 5-10
    (0.8-0.9); a gradient drowned in noise about 1-1.5 (below 0.35).
    """
    if not math.isfinite(ratio):
        return 1.0 if ratio > 0 else 0.0
    return max(0.0, 1.0 - 1.0 / ratio) if ratio > 0 else 0.0
