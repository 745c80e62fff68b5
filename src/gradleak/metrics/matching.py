"""Pairing reconstructions with the originals before any metric (optimal assignment).

A batch attack returns images in no particular order; each original is compared with the
reconstruction assigned to it, never with the whole batch. The assignment is the Hungarian
algorithm on the pixel-space mean squared error of every (reconstruction, original) pair: that
cost matrix comes from one matrix product (chunked, its memory checked before it is allocated), so
scoring a batch of N costs N SSIMs, not N^2 (at batch 256, N^2 SSIMs took 81 s).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from gradleak.metrics.image import mse, psnr, ssim
from gradleak.resources import check_fits

# Rows of the cost matrix computed at once (bounds the temporary products).
CHUNK = 256


def distances(recon: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """``out[i, j]`` = mean squared error of ``recon[i]`` and ``truth[j]`` (pixels clamped to
    [0, 1]), R x M, from ``|a|^2 + |b|^2 - 2 a.b`` row chunk by row chunk, the product in float32
    (it only ranks the pairs; the metrics are computed in float64 on the pairs chosen)."""
    r, m = len(recon), len(truth)
    d = int(np.prod(truth.shape[1:]))
    check_fits(8 * r * m + 4 * (2 * CHUNK * max(m, d) + m * d), f"matching {r} reconstructions to {m} originals",
               "audit.clients", "audit clients with smaller batches")  # fmt: skip
    b = truth.detach().reshape(m, d).float().clamp(0, 1)
    bb = b.double().pow(2).sum(1)
    out = torch.empty(r, m, dtype=torch.float64)
    for lo in range(0, r, CHUNK):
        a = recon[lo : lo + CHUNK].detach().reshape(-1, d).float().clamp(0, 1)
        out[lo : lo + CHUNK] = (a.double().pow(2).sum(1)[:, None] + bb[None] - 2 * (a @ b.T).double()).clamp_min(0) / d
    return out


def assign(recon: torch.Tensor, truth: torch.Tensor) -> np.ndarray:
    """For each original j, the index of its reconstruction (``-1`` where there are fewer), by the
    assignment of least total pixel error."""
    rows, cols = linear_sum_assignment(distances(recon, truth).numpy())
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
    assignment: np.ndarray | None = None,
) -> ReconstructionScore:
    """Match reconstructions to originals (or take ``assignment``), then compute MSE, PSNR and
    SSIM per original: linear in the batch beyond the matching."""
    idx = assign(recon, truth) if assignment is None else assignment
    if (idx < 0).any():
        raise ValueError(f"{len(recon)} reconstructions for {len(truth)} originals: need at least as many")
    matched = recon[torch.as_tensor(idx)]
    acc = None
    if recon_labels is not None and true_labels is not None:
        acc = label_accuracy(recon_labels, true_labels)
    return ReconstructionScore(idx, mse(matched, truth), psnr(matched, truth), ssim(matched, truth), acc)
