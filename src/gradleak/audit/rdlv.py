"""The Relative Data Leakage Value (Hatamizadeh et al., IEEE TMI 2023), for any attack and modality.

For training example i, paired with reconstruction r, against the audit's prior p (what the server
would guess without the update: the mean image of public data, the unigram text, ...):
    RDLV_i = (S(r, i) - S(p, i)) / |S(p, i)|
with S a similarity of the examples' input spec (SSIM by default for images); for a distance (MSE)
the relative reduction (D(p, i) - D(r, i)) / D(p, i). Positive: the reconstruction is closer to the
example than the prior was. Measured against the audit's prior rather than an attack's start, it
means the same for an exact attack (which has no start) as for an optimisation. Each example is
paired with one reconstruction by the assignment of least total ``spec.cost`` (the same pairing as
every other metric), so the cost is linear in the batch beyond that matching; the client's value
for the round is the max (or min) over its examples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradleak.metrics.matching import assign
from gradleak.modality import InputSpec

# The denominator is |S(p, i)| floored here: the published formula whenever the prior's similarity
# is positive, and a prior unrelated to the example cannot turn a small gain into an unbounded value
# or flip its sign.
MIN_DENOMINATOR = 1e-3


@dataclass(frozen=True)
class RDLV:
    value: float  # the client's RDLV for the round
    per_example: list[float]  # RDLV of each training example
    best: list[int]  # index of the reconstruction paired with each training example


def rdlv(
    recon: torch.Tensor,
    prior: torch.Tensor,
    truth: torch.Tensor,
    spec: InputSpec,
    *,
    metric: str,
    reduce: str = "max",
    assignment: np.ndarray | None = None,
) -> RDLV:
    """The RDLV of a batch of reconstructions against ``prior`` (one example, or one per original),
    each original paired by ``assignment`` (default: ``metrics.assign``)."""
    idx = assign(recon, truth, spec) if assignment is None else assignment
    m = spec.metrics[metric]
    s = m(recon[torch.as_tensor(idx)], truth)
    p = m(prior.expand(len(truth), *prior.shape[1:]) if len(prior) == 1 else prior, truth)
    gain = s - p if m.higher_is_better else p - s
    per_example = gain / p.abs().clamp_min(MIN_DENOMINATOR)
    value = per_example.max() if reduce == "max" else per_example.min()
    return RDLV(float(value), [float(v) for v in per_example], [int(i) for i in idx])
