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
   feasibility problem, p in the column space to 1e-6 per round, written in p alone through n
   pivot rounds, so the solver stops at the first point it finds. Noisy sums: as close as
   possible (L1) to the column space, ``min sum e`` subject to ``-e <= p - Q a <= e``. Solved
   with HiGHS (``scipy.optimize.milp``) by default, or SCIP or Gurobi when installed
   (``gradleak.attacks.milp``), clients in parallel processes that each receive the program once.
3. The participation matrix, then every client's update by least squares on the sums.

A solver failure or time-out raises with the client and rounds concerned; nothing is guessed.
Ill-posed inputs (fewer rounds than clients, sums of lower rank than the number of clients) are
refused before any solving.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace

import numpy as np
from scipy.linalg import qr
from scipy.sparse import csr_matrix, hstack, identity, vstack

from gradleak.attacks.milp import Program, check_solver, solve
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


def _program(q: np.ndarray, window: int, exact: bool) -> Program:
    """One client's program with its window-count rows last (bounds 0 here: each client sets its
    own). The matrix is the same for every client, so it is built once and handed to each worker
    process once.

    Exact sums: a feasibility problem in p alone. A vector of the column space is fixed by its
    entries at n pivot rounds (chosen by QR with column pivoting, so the map is well conditioned):
    ``p[rest] = B p[pivots]`` with ``B = Q[rest] Q[pivots]^-1``, required to ``EXACT_TOL`` per
    round, so the solver stops at the first point it finds. (Against ``|p - Q a| <= tol`` with
    ``a`` free, which this replaces, 100 clients/400 rounds take 25 s instead of leaving clients at
    a 60 s time limit.) Noisy sums: ``min sum e`` subject to ``-e <= p - Q a <= e``, p binary,
    a free, which the solver must prove optimal."""
    t, n = q.shape
    win = _window_matrix(t, window)
    w = win.shape[0]
    if exact:  # variables: p (t, binary)
        _, _, perm = qr(q.T, mode="economic", pivoting=True)
        pivots, rest = perm[:n], np.sort(perm[n:])
        b = np.linalg.solve(q[pivots].T, q[rest].T).T  # Q[rest] Q[pivots]^-1
        rows = np.zeros((t - n, t))
        rows[np.arange(t - n), rest] = 1.0
        rows[:, pivots] = -b
        return Program(np.zeros(t), vstack([csr_matrix(rows), win]).tocsr(),
                       np.concatenate([np.full(t - n, -EXACT_TOL), np.zeros(w)]),
                       np.concatenate([np.full(t - n, EXACT_TOL), np.zeros(w)]),
                       np.zeros(t), np.ones(t), np.ones(t))  # fmt: skip
    # variables: p (t, binary) | a (n, free) | e (t, >= 0)
    eye, qs = identity(t, format="csr"), csr_matrix(q)
    a = vstack([hstack([eye, -qs, -eye]), hstack([-eye, qs, -eye]), hstack([win, csr_matrix((w, n + t))])])
    return Program(np.concatenate([np.zeros(t + n), np.ones(t)]), a.tocsr(),
                   np.concatenate([np.full(2 * t, -np.inf), np.zeros(w)]), np.zeros(2 * t + w),
                   np.concatenate([np.zeros(t), np.full(n, -np.inf), np.zeros(t)]),
                   np.concatenate([np.ones(t), np.full(n, np.inf), np.full(t, np.inf)]),
                   np.concatenate([np.ones(t), np.zeros(n + t)]))  # fmt: skip


_PROGRAM: tuple[Program, int, str] | None = None  # (program, rounds, solver) of this process


def _use_program(program: Program, rounds: int, solver: str) -> None:
    global _PROGRAM
    _PROGRAM = (program, rounds, solver)


def _solve_client(args: tuple) -> tuple[int, np.ndarray]:
    """One client's participation column, from the program of ``_use_program`` and its counts."""
    k, name, counts_k, time_limit = args
    assert _PROGRAM is not None, "_use_program must run first"
    prog, t, solver = _PROGRAM
    w = len(counts_k)
    mine = replace(prog, row_lb=np.concatenate([prog.row_lb[:-w], counts_k]),
                   row_ub=np.concatenate([prog.row_ub[:-w], counts_k]))  # fmt: skip
    out = solve(mine, solver=solver, time_limit=time_limit)
    if out.x is None:
        raise SolverFailure(f"client {name}, rounds 0-{t - 1}: {out.status}")
    return k, np.round(out.x[:t]).astype(np.int64)


def participation_columns(
    sums: np.ndarray,
    counts: np.ndarray,
    window: int,
    *,
    only: list[int] | None = None,
    time_limit: float = 60.0,
    workers: int | None = None,
    client_ids: list[int] | None = None,
    solver: str = "highs",
) -> dict[int, np.ndarray]:
    """Solve the participation column of each client (column index -> T vector of 0/1).

    ``only``: the column indices to solve (default: all). Recovering the updates needs every
    column; a subset serves to time large federations client by client. The other arguments are
    those of :func:`disaggregate`.
    """
    return _solve(sums, counts, window, only, time_limit, workers, client_ids, solver)[0]


def _solve(sums: np.ndarray, counts: np.ndarray, window: int, only: list[int] | None, time_limit: float,
           workers: int | None, client_ids: list[int] | None,
           solver: str) -> tuple[dict[int, np.ndarray], np.ndarray, np.ndarray]:  # fmt: skip
    """(columns, the column-space basis Q, the singular values)."""
    check_solver(solver, key="solver")
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts, dtype=np.int64)
    s = check_well_posed(sums, counts, window)
    n = counts.shape[1]
    q, _ = column_space(sums, n)
    names = client_ids or list(range(n))
    exact = len(s) <= n or s[n] <= EXACT_RANK_TOL * s[0]
    program = _program(q, window, exact)
    todo = list(range(n)) if only is None else list(only)
    jobs = [(k, names[k], counts[:, k].astype(float), time_limit) for k in todo]
    workers = min(workers or os.cpu_count() or 1, len(jobs))
    if workers > 1:
        with ProcessPoolExecutor(workers, initializer=_use_program, initargs=(program, len(sums), solver)) as pool:
            return dict(pool.map(_solve_client, jobs)), q, s
    _use_program(program, len(sums), solver)
    return dict(_solve_client(j) for j in jobs), q, s


def disaggregate(
    sums: np.ndarray,
    counts: np.ndarray,
    window: int,
    *,
    time_limit: float = 60.0,
    workers: int | None = None,
    client_ids: list[int] | None = None,
    solver: str = "highs",
) -> Disaggregation:
    """Recover the participation matrix and every client's update from round sums and counts.

    Args:
        sums: T x d, one row per round (the flattened sum of the round's updates).
        counts: W x n, how often each client took part in each window of ``window`` rounds.
        window: rounds per window.
        time_limit: seconds the solver may spend on one client.
        workers: processes solving clients in parallel (default: the machine's cores).
        client_ids: the clients' names in errors (default: their column index).
        solver: "highs" (scipy, the default), "scip" or "gurobi" (when installed).
    """
    start = time.perf_counter()
    sums = np.asarray(sums, dtype=np.float64)
    columns, q, s = _solve(sums, counts, window, None, time_limit, workers, client_ids, solver)
    n = len(columns)
    p = np.stack([columns[k] for k in range(n)], axis=1)
    residuals = np.abs(p - q @ (q.T @ p)).sum(axis=0)
    updates, *_ = np.linalg.lstsq(p.astype(np.float64), sums, rcond=None)
    return Disaggregation(p, updates, residuals, s, time.perf_counter() - start)
