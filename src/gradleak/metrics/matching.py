"""Pairing reconstructions with the originals before any metric (optimal assignment).

A batch attack returns images in no particular order; each original is compared with the
reconstruction assigned to it by the Hungarian algorithm on pairwise similarity, never with the
whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from gradleak.metrics.image import HIGHER_IS_BETTER, METRICS, mse, psnr, ssim


def pairwise(metric: str, recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``out[i, j]`` = metric(recon[i], truth[j]) for every pair."""
    fn = METRICS[metric]
    r, t = len(recon), len(truth)
    a = recon.repeat_interleave(t, dim=0)
    b = truth.repeat(r, 1, 1, 1)
    return fn(a, b).view(r, t)


def assign(recon: torch.Tensor, truth: torch.Tensor, by: str = "ssim") -> np.ndarray:
    """For each original j, the index of its reconstruction (``-1`` where there are fewer)."""
    scores = pairwise(by, recon, truth).numpy()
    rows, cols = linear_sum_assignment(scores, maximize=HIGHER_IS_BETTER[by])
    out = np.full(len(truth), -1, dtype=np.int64)
    out[cols] = rows
    return out


def label_accuracy(recovered: torch.Tensor, truth: torch.Tensor) -> float:
    """Fraction of the true labels recovered, as multisets (order-free)."""
    k = int(torch.cat([recovered.flatten(), truth.flatten(), torch.zeros(1, dtype=truth.dtype)]).max()) + 1
    hit = torch.minimum(torch.bincount(recovered, minlength=k), torch.bincount(truth, minlength=k))
    return float(hit.sum()) / max(len(truth), 1)


@dataclass(frozen=True)
class ReconstructionScore:
    """Per-original metrics after matching, and their means."""

    assignment: np.ndarray
    mse: torch.Tensor
    psnr: torch.Tensor
    ssim: torch.Tensor
    label_accuracy: float | None

    def summary(self) -> dict[str, float | None]:
        return {
            "mse": float(self.mse.mean()),
            "psnr": float(self.psnr.mean()),
            "ssim": float(self.ssim.mean()),
            "label_accuracy": self.label_accuracy,
        }


def score(
    recon: torch.Tensor,
    truth: torch.Tensor,
    recon_labels: torch.Tensor | None = None,
    true_labels: torch.Tensor | None = None,
    *,
    by: str = "ssim",
) -> ReconstructionScore:
    """Match reconstructions to originals, then compute MSE, PSNR, SSIM per original."""
    idx = assign(recon, truth, by)
    if (idx < 0).any():
        raise ValueError(f"{len(recon)} reconstructions for {len(truth)} originals: need at least as many")
    matched = recon[torch.as_tensor(idx)]
    acc = None
    if recon_labels is not None and true_labels is not None:
        acc = label_accuracy(recon_labels, true_labels)
    return ReconstructionScore(idx, mse(matched, truth), psnr(matched, truth), ssim(matched, truth), acc)
