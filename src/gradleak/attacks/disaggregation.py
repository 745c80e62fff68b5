"""Gradient disaggregation (Lam et al., ICML 2021): individual updates from secure sums.

Under secure aggregation the server sees, for each round t, only ``S_t = sum_k P[t, k] U_k``
(P the 0/1 participation matrix, U_k client k's update), plus how often each client took part in
each window of L rounds (``counts[w, k]``), as a deployment's logs give. When the updates change
little between rounds, every participation column ``P[:, k]`` lies in the column space of the
stacked sums. The attack:

1. SVD of the T x d sums; the column space is spanned by the first n left singular vectors (n the
   number of clients: the right cut-off also for noisy sums, whose spectrum has no gap to find).
2. For each client, a mixed-integer program over its T rounds: binary ``p`` with the logged count
   in every window and in the column space. Exact sums (singular value n+1 numerically zero): a
   feasibility problem, ``|p - Q a| <= 1e-6`` per round with ``a`` free, so the solver stops at
   the first point it finds (50 clients/200 rounds: 3.5 s against 10 s for the L1 program).
   Noisy sums: as close as possible (L1) to the column space, ``min sum e`` subject to
   ``-e <= p - Q a <= e``. Solved with HiGHS (``scipy.optimize.milp``), clients in parallel
   processes.
3. The participation matrix, then every client's update by least squares on the sums.

A solver failure or time-out raises with the client and rounds concerned; nothing is guessed.
Ill-posed inputs (fewer rounds than clients, sums of lower rank than the number of clients) are
refused before any solving.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix, hstack, identity, vstack

from gradleak.errors import GradleakError


class IllPosed(GradleakError):
    """The sums and counts cannot determine the participation (detected before solving)."""


class SolverFailure(GradleakError):
    """The solver did not prove a solution for a client: no matrix is returned."""


@dataclass(frozen=True)
class Disaggregation:
    participation: np.ndarray  # T x n, 0/1
    updates: np.ndarray  # n x d, least squares on the sums
    residuals: np.ndarray  # n: L1 norm of each recovered column minus its projection on the column space
    singular_values: np.ndarray  # of the sums, for inspecting the rank
    seconds: float


def window_counts(participation: np.ndarray, window: int) -> np.ndarray:
    """How often each client took part in each window of ``window`` rounds (W x n); the last
    window may be shorter."""
    t = participation.shape[0]
    return np.stack([participation[s : s + window].sum(0) for s in range(0, t, window)]).astype(np.int64)


def column_space(sums: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(orthonormal basis T x n of the sums' leading column space, all singular values)."""
    u, s, _ = np.linalg.svd(sums, full_matrices=False)
    return u[:, :n], s


def check_well_posed(sums: np.ndarray, counts: np.ndarray, window: int, rank_tol: float = 1e-8) -> np.ndarray:
    """Raise IllPosed for inputs the attack cannot resolve; return the singular values."""
    t, _ = sums.shape
    w, n = counts.shape
    if t < n:
        raise IllPosed(f"{t} rounds for {n} clients: need at least as many rounds as clients")
    if w != -(-t // window):
        raise IllPosed(f"counts have {w} windows, but {t} rounds in windows of {window} make {-(-t // window)}")
    sizes = np.array([min(window, t - s) for s in range(0, t, window)])
    if (counts < 0).any() or (counts > sizes[:, None]).any():
        raise IllPosed("a participation count is negative or larger than its window")
    _, s = column_space(sums, n)
    if len(s) < n or s[n - 1] <= rank_tol * s[0]:
        raise IllPosed(
            f"the sums have rank below {n} (singular value {n}: {s[n - 1] if len(s) >= n else 0:.3g}, "
            f"largest {s[0]:.3g}): some clients' participation is not identifiable"
        )
    return s


# Sums whose (n+1)-th singular value is below this fraction of the largest are exact (rank n).
EXACT_RANK_TOL = 1e-9
# In the exact case, how far (per round) a participation vector may lie from the column space.
EXACT_TOL = 1e-6


def _window_matrix(t: int, window: int) -> csr_matrix:
    rows = [(s, min(s + window, t)) for s in range(0, t, window)]
    sizes = [b - a for a, b in rows]
    return csr_matrix((np.ones(t), (np.repeat(np.arange(len(rows)), sizes), np.arange(t))), shape=(len(rows), t))


def _solve_client(args: tuple) -> tuple[int, np.ndarray]:
    """One client's participation column. Exact sums: a feasibility problem (binary p with its
    window counts and ``|p - Q a| <= EXACT_TOL`` per round), so HiGHS stops at the first point it
    finds. Noisy sums: the binary p closest to the column space in L1 (``min sum e`` with
    ``-e <= p - Q a <= e``), which HiGHS must prove optimal."""
    k, name, q, counts_k, window, time_limit, exact = args
    t, n = q.shape
    win = _window_matrix(t, window)
    w = win.shape[0]
    eye, qs = identity(t, format="csr"), csr_matrix(q)
    if exact:  # variables: p (t, binary) | a (n, free)
        c = np.zeros(t + n)
        a = vstack([hstack([eye, -qs]), hstack([win, csr_matrix((w, n))])]).tocsr()
        lb = np.concatenate([np.full(t, -EXACT_TOL), counts_k])
        ub = np.concatenate([np.full(t, EXACT_TOL), counts_k])
        extra_lb, extra_ub = np.zeros(0), np.zeros(0)
    else:  # variables: p (t, binary) | a (n, free) | e (t, >= 0)
        c = np.concatenate([np.zeros(t + n), np.ones(t)])
        a = vstack([hstack([eye, -qs, -eye]), hstack([-eye, qs, -eye]),
                    hstack([win, csr_matrix((w, n + t))])]).tocsr()  # fmt: skip
        lb = np.concatenate([np.full(2 * t, -np.inf), counts_k])
        ub = np.concatenate([np.zeros(2 * t), counts_k])
        extra_lb, extra_ub = np.zeros(t), np.full(t, np.inf)
    bounds = Bounds(np.concatenate([np.zeros(t), np.full(n, -np.inf), extra_lb]),
                    np.concatenate([np.ones(t), np.full(n, np.inf), extra_ub]))  # fmt: skip
    integrality = np.concatenate([np.ones(t), np.zeros(len(c) - t)])
    res = milp(c, constraints=LinearConstraint(a, lb, ub), integrality=integrality, bounds=bounds,
               options={"time_limit": time_limit, "disp": False})  # fmt: skip
    if res.status != 0 or res.x is None:
        raise SolverFailure(f"client {name}, rounds 0-{t - 1}: HiGHS status {res.status}: {res.message}")
    return k, np.round(res.x[:t]).astype(np.int64)


def disaggregate(
    sums: np.ndarray,
    counts: np.ndarray,
    window: int,
    *,
    time_limit: float = 60.0,
    workers: int | None = None,
    client_ids: list[int] | None = None,
) -> Disaggregation:
    """Recover the participation matrix and every client's update from round sums and counts.

    Args:
        sums: T x d, one row per round (the flattened sum of the round's updates).
        counts: W x n, how often each client took part in each window of ``window`` rounds.
        window: rounds per window.
        time_limit: seconds HiGHS may spend on one client.
        workers: processes solving clients in parallel (default: the machine's cores).
        client_ids: the clients' names in errors (default: their column index).
    """
    start = time.perf_counter()
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    s = check_well_posed(sums, counts, window)
    n = counts.shape[1]
    q, _ = column_space(sums, n)
    names = client_ids or list(range(n))
    exact = len(s) <= n or s[n] <= EXACT_RANK_TOL * s[0]
    jobs = [(k, names[k], q, counts[:, k].astype(float), window, time_limit, exact) for k in range(n)]
    workers = min(workers or os.cpu_count() or 1, n)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_solve_client, jobs))
    else:
        results = [_solve_client(j) for j in jobs]
    p = np.zeros((sums.shape[0], n), dtype=np.int64)
    residuals = np.zeros(n)
    for k, col in results:
        p[:, k] = col
        residuals[k] = np.abs(col - q @ (q.T @ col)).sum()
    updates, *_ = np.linalg.lstsq(p.astype(np.float64), sums, rcond=None)
    return Disaggregation(p, updates, residuals, s, time.perf_counter() - start)
