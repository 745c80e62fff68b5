"""Small float64 linear-algebra helpers shared by the attacks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias, overload

import numpy as np
import torch

Tensorish: TypeAlias = np.ndarray | torch.Tensor


@overload
def as_f64(value: Tensorish) -> np.ndarray: ...


@overload
def as_f64(value: None) -> None: ...


def as_f64(value: Tensorish | None) -> np.ndarray | None:
    """Return ``value`` as a float64 numpy array (None stays None); tensors are detached."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.float64)


@dataclass(frozen=True)
class LowRank:
    """Rank-``k`` factorisation ``G ~= U diag(s) Vt`` with orthonormal U (m x k), Vt (k x n)."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    #: singular value k+1 divided by singular value k: ~1e-5 or below when G truly has rank k.
    tail_ratio: float


def range_finder_svd(g: np.ndarray, rank: int, oversample: int = 10, seed: int = 0) -> LowRank:
    """Truncated SVD of ``g`` via a randomised range finder (Halko et al.).

    A full SVD of a 1000 x 3072 gradient costs seconds on a loaded CPU; a Gaussian sketch
    with ``rank + oversample`` columns costs a fraction of that and is exact to rounding here,
    because gradients of a batch of B inputs have rank B with a spectral gap of 1e5 or more.
    """
    m, n = g.shape
    k = min(rank + oversample, m, n)
    omega = np.random.default_rng(seed).standard_normal((n, k))
    basis, _ = np.linalg.qr(g @ omega)
    # One power iteration keeps the basis accurate when the gap is smaller than usual.
    basis, _ = np.linalg.qr(g @ (g.T @ basis))
    u_small, s, vt = np.linalg.svd(basis.T @ g, full_matrices=False)
    tail = float(s[rank] / s[rank - 1]) if len(s) > rank and s[rank - 1] > 0 else 0.0
    return LowRank(basis @ u_small[:, :rank], s[:rank], vt[:rank], tail)


def null_vector(a: np.ndarray) -> tuple[np.ndarray, float]:
    """Unit vector minimising ``|a x|`` and the ratio of the two smallest singular values."""
    _, s, vt = np.linalg.svd(a, full_matrices=False)
    if a.shape[0] < a.shape[1]:
        return vt[-1], 0.0
    return vt[-1], float(s[-1] / s[-2]) if len(s) > 1 and s[-2] > 0 else 0.0


def unit_rows(a: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (zero rows stay zero)."""
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norms > 0, norms, 1.0)
