"""The mixed-integer programs of one client's column (solved by
``gradleak.attacks.disaggregation.milp``).

Exact sums (the chunk's singular value n+1 numerically zero): a feasibility problem in p alone. A
vector of the column space is fixed by its entries at n pivot rounds (chosen by QR with column
pivoting, so the map is well conditioned): ``p[rest] = B p[pivots]`` with
``B = Q[rest] Q[pivots]^-1``, required to ``EXACT_TOL`` per round, so the solver stops at the first
point it finds. (Against ``|p - Q a| <= tol`` with ``a`` free, 100 clients/400 rounds take 25 s
instead of leaving clients at a 60 s time limit.)

Noisy sums, for a client the search could not place: ``min sum e`` subject to
``-e <= p - Q a <= e``, p binary, a free (the L1 distance to the column space).
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import qr
from scipy.sparse import csr_matrix, hstack, identity, vstack

from gradleak.attacks.disaggregation.milp import Program

# In the exact case, how far (per round) a participation vector may lie from the column space.
EXACT_TOL = 1e-6


def pivot_map(q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pivot rounds, other rounds, B with p[rest] = B p[pivots]) for the basis q (T x n)."""
    n = q.shape[1]
    _, _, perm = qr(q.T, mode="economic", pivoting=True)
    pivots, rest = perm[:n], np.sort(perm[n:])
    return pivots, rest, np.linalg.solve(q[pivots].T, q[rest].T).T


def exact_program(
    t: int,
    pivots: np.ndarray,
    rest: np.ndarray,
    b: np.ndarray,
    a_rows: np.ndarray,
    counts: np.ndarray,
) -> Program:
    """Binary p (t) in the column space to EXACT_TOL per round, meeting the counts."""
    n = len(pivots)
    rows = np.zeros((t - n, t))
    rows[np.arange(t - n), rest] = 1.0
    rows[:, pivots] = -b
    return Program(
        np.zeros(t),
        vstack([csr_matrix(rows), csr_matrix(a_rows)]).tocsr(),
        np.concatenate([np.full(t - n, -EXACT_TOL), counts]),
        np.concatenate([np.full(t - n, EXACT_TOL), counts]),
        np.zeros(t),
        np.ones(t),
        np.ones(t),
    )


def l1_program(q: np.ndarray, a_rows: np.ndarray, counts: np.ndarray) -> Program:
    """Variables p (t, binary) | a (n, free) | e (t, >= 0): ``min sum e``, ``|p - Q a| <= e``."""
    t, n = q.shape
    w = len(a_rows)
    eye, qs = identity(t, format="csr"), csr_matrix(q)
    a = vstack(
        [
            hstack([eye, -qs, -eye]),
            hstack([-eye, qs, -eye]),
            hstack([csr_matrix(a_rows), csr_matrix((w, n + t))]),
        ]
    )
    return Program(
        np.concatenate([np.zeros(t + n), np.ones(t)]),
        a.tocsr(),
        np.concatenate([np.full(2 * t, -np.inf), counts]),
        np.concatenate([np.zeros(2 * t), counts]),
        np.concatenate([np.zeros(t), np.full(n, -np.inf), np.zeros(t)]),
        np.concatenate([np.ones(t), np.full(n, np.inf), np.full(t, np.inf)]),
        np.concatenate([np.ones(t), np.zeros(n + t)]),
    )
