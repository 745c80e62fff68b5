"""The sums' column space, and how the rounds are cut into chunks that each have one.

When every client's update is constant, the T x d sums have rank n (the clients) and their column
space holds every participation column. Noise adds a floor to the spectrum; drift (updates that
change as the model trains) spreads each client over several directions, so over a long horizon
no n-dimensional space holds the columns. Chunks of rounds short enough for the updates to be
nearly constant, and long enough for the counts and the noise to pin the columns, restore it.
The gap ratio ``s[n] / s[n-1]`` (the (n+1)-th singular value over the n-th) measures how clearly
a chunk's spectrum separates the clients from the rest: numerically 0 for exact sums, about 0.4
where recovery still works under noise, above 0.9 where drift has erased the space.
"""

from __future__ import annotations

import numpy as np

# Sums whose (n+1)-th singular value is below this fraction of the largest are exact (rank n).
EXACT_RANK_TOL = 1e-9


def basis(sums: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(orthonormal basis T x n of the sums' leading column space, all singular values)."""
    u, s, _ = np.linalg.svd(sums, full_matrices=False)
    return u[:, :n], s


def gap_ratio(s: np.ndarray, n: int) -> float:
    """``s[n] / s[n-1]``: 0 when the sums have rank n or less."""
    if len(s) <= n or s[n - 1] <= 0:
        return 0.0
    return float(s[n] / s[n - 1])


def is_exact(s: np.ndarray, n: int) -> bool:
    return len(s) <= n or s[n] <= EXACT_RANK_TOL * s[0]


def even_chunks(rounds: int, length: int, step: int, shortest: int = 1) -> list[tuple[int, int]]:
    """Consecutive chunks of ``length`` rounds (a multiple of ``step``); a remainder shorter than
    ``shortest`` rounds joins the last chunk."""
    length = max(step, length - length % step)
    chunks = [(a, min(a + length, rounds)) for a in range(0, rounds, length)]
    if len(chunks) > 1 and chunks[-1][1] - chunks[-1][0] < shortest:
        chunks[-2:] = [(chunks[-2][0], rounds)]
    return chunks


def plan_chunks(sums: np.ndarray, n: int, step: int) -> list[tuple[int, int]]:
    """The chunking whose chunks have the clearest gaps at n.

    Candidates: the whole horizon, and chunk lengths from 2n rounds (fewer rounds pin a column
    poorly) up to max(5n, 10 windows) (Lam et al.'s default), in multiples of ``step`` (the counts'
    window), no chunk shorter than 2n. If some length makes every chunk exact, the longest such
    wins (more rounds per program, fewer programs); otherwise the smallest worst gap ratio over the
    chunks, the whole horizon unless a length beats it by 10%.
    """
    t = sums.shape[0]
    shortest = -(-2 * n // step) * step
    best_ratio = gap_ratio(basis(sums, n)[1], n)
    if best_ratio == 0.0 or is_exact(basis(sums, n)[1], n):
        return [(0, t)]
    best, exact = [(0, t)], None
    for length in range(max(step, shortest), min(t - 1, max(5 * n, 10 * step)) + 1, step):
        chunks = even_chunks(t, length, step, shortest)
        spectra = [basis(sums[a:b], n)[1] for a, b in chunks]
        if all(is_exact(sp, n) for sp in spectra):
            exact = chunks  # lengths grow: the last exact one is the longest
            continue
        worst = max(gap_ratio(sp, n) for sp in spectra)
        if worst < 0.9 * best_ratio:
            best_ratio, best = worst, chunks
    return exact or best
