"""The Relative Data Leakage Value (Hatamizadeh et al., IEEE TMI 2023).

For training image i and reconstruction r started from prior p_r:
    RDLV_ir = (S(r, i) - S(p_r, i)) / S(p_r, i)
with S a similarity (SSIM by default, or PSNR); for MSE, a distance, the relative reduction
(D(p_r, i) - D(r, i)) / D(p_r, i). Positive: the reconstruction is closer to the image than the
attack's start was. Each image takes its best reconstruction (the most similar one, by S); the
client's value for the round is the max (or min) over its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gradleak.metrics.image import HIGHER_IS_BETTER
from gradleak.metrics.matching import pairwise

# The denominator is |S(p_r, i)| floored here: the published formula whenever the prior's similarity
# is positive, and a prior unrelated to the image cannot turn a small gain into an unbounded value
# or flip its sign.
MIN_DENOMINATOR = 1e-3


@dataclass(frozen=True)
class RDLV:
    value: float  # the client's RDLV for the round
    per_image: list[float]  # best RDLV of each training image
    best: list[int]  # index of the best reconstruction of each training image


def rdlv_matrix(recon: torch.Tensor, prior: torch.Tensor, truth: torch.Tensor, metric: str) -> torch.Tensor:
    """RDLV of every (reconstruction, training image) pair, R x M."""
    s = pairwise(metric, recon, truth)
    p = pairwise(metric, prior, truth)
    denom = p.abs().clamp_min(MIN_DENOMINATOR)
    gain = s - p if HIGHER_IS_BETTER[metric] else p - s
    return gain / denom


def rdlv(recon: torch.Tensor, prior: torch.Tensor, truth: torch.Tensor, *, metric: str = "ssim",
         reduce: str = "max") -> RDLV:  # fmt: skip
    s = pairwise(metric, recon, truth)
    best_idx = s.argmax(dim=0) if HIGHER_IS_BETTER[metric] else s.argmin(dim=0)
    m = rdlv_matrix(recon, prior, truth, metric)
    per_image = m[best_idx, torch.arange(len(truth))]
    value = per_image.max() if reduce == "max" else per_image.min()
    return RDLV(float(value), [float(v) for v in per_image], [int(i) for i in best_idx])
