"""The Relative Data Leakage Value (Hatamizadeh et al., IEEE TMI 2023).

For training image i, paired with reconstruction r (started from prior p_r):
    RDLV_i = (S(r, i) - S(p_r, i)) / |S(p_r, i)|
with S a similarity (SSIM by default, or PSNR); for MSE, a distance, the relative reduction
(D(p_r, i) - D(r, i)) / D(p_r, i). Positive: the reconstruction is closer to the image than the
attack's start was. Each image is paired with one reconstruction by the assignment of least total
pixel error (``metrics.assign``, the same pairing as SSIM and PSNR), so the cost is linear in the
batch beyond that matching; the client's value for the round is the max (or min) over its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from gradleak.metrics.image import HIGHER_IS_BETTER, METRICS
from gradleak.metrics.matching import assign

# The denominator is |S(p_r, i)| floored here: the published formula whenever the prior's similarity
# is positive, and a prior unrelated to the image cannot turn a small gain into an unbounded value
# or flip its sign.
MIN_DENOMINATOR = 1e-3


@dataclass(frozen=True)
class RDLV:
    value: float  # the client's RDLV for the round
    per_image: list[float]  # RDLV of each training image
    best: list[int]  # index of the reconstruction paired with each training image


def rdlv(recon: torch.Tensor, prior: torch.Tensor, truth: torch.Tensor, *, metric: str = "ssim",
         reduce: str = "max", assignment: np.ndarray | None = None) -> RDLV:  # fmt: skip
    """The RDLV of a batch of reconstructions (``prior[r]``: the start of ``recon[r]``), each image
    paired by ``assignment`` (default: ``metrics.assign``)."""
    idx = assign(recon, truth) if assignment is None else assignment
    pick = torch.as_tensor(idx)
    s = METRICS[metric](recon[pick], truth)
    p = METRICS[metric](prior[pick], truth)
    gain = s - p if HIGHER_IS_BETTER[metric] else p - s
    per_image = gain / p.abs().clamp_min(MIN_DENOMINATOR)
    value = per_image.max() if reduce == "max" else per_image.min()
    return RDLV(float(value), [float(v) for v in per_image], [int(i) for i in idx])
