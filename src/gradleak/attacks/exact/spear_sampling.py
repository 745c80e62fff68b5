"""SPEAR's sampling search for the columns of Q, sped up with the server's W1 and b1.

Used when the layer after the ReLU is unknown or too wide for the lifted solver.  A column q_i
of Q is orthogonal to every row of L whose neuron is inactive for sample i, so the null vector
of B-1 rows that are all inactive for one sample is q_i, recognisable by the many zeros of
``L q``.  Three things make this practical:

* neurons active for exactly one sample make several rows of L exactly parallel to that
  sample's dual direction p_i (a row of Q^{-1}); each such direction is a free constraint for
  every other column (q_k is orthogonal to p_i for k != i), shrinking the number of rows that
  must be drawn by one;
* each sparse candidate is refined on all its zero rows, then put through a feasibility LP:
  is there an input in the span of the gradient that produces exactly this ReLU pattern under
  the known W1, b1?  Blends of near-duplicate inputs pass the sparsity test but fail the LP;
* everything is batched float64 linear algebra, stopped by a time or sample budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog
from scipy.sparse.csgraph import connected_components

from gradleak.attacks.exact.linalg import null_vector

#: |L_j q| below this (rows of L and q of unit norm) counts as an exact zero.  Float32
#: gradients put true zeros near 1e-7 here; active rows sit far above except by chance.
ZERO_TOL = 1e-5
#: |L_j q| above this counts as certainly active in the feasibility LP.
ACTIVE_TOL = 1e-3
#: Once two columns are accepted, candidates with fewer zeros than this fraction of their
#: median zero count are taken for blends and skip the (costly) feasibility LP.
BLEND_ZERO_FRACTION = 0.75
#: Feasibility LPs (~10-20 ms each) allowed per batch of sampled candidates.
LP_PER_BATCH = 4


@dataclass(frozen=True)
class SamplingOutcome:
    """The found columns of Q (unit norm, one per row of ``found``) and search statistics."""

    found: np.ndarray
    samples: int
    known_directions: int
    rejected_by_lp: int


def twin_directions(unit_basis: np.ndarray, cos_tol: float = 1e-10) -> np.ndarray:
    """Dual directions p_i given by groups of exactly parallel rows (single-active neurons)."""
    gram = np.abs(unit_basis @ unit_basis.T)
    np.fill_diagonal(gram, 0.0)
    n_comp, comp = connected_components(gram > 1.0 - cos_tol, directed=False)
    dirs: list[np.ndarray] = []
    for c in range(n_comp):
        rows = unit_basis[comp == c]
        if len(rows) < 2:
            continue
        rows = rows * np.sign(rows @ rows[0])[:, None]
        d = rows.mean(0)
        d /= np.linalg.norm(d)
        if all(abs(d @ e) < 1.0 - 1e-8 for e in dirs):
            dirs.append(d)
    out = np.array(dirs).reshape(-1, unit_basis.shape[1])
    if len(out) and np.linalg.matrix_rank(out, tol=1e-6) < len(out):
        return out[:0]  # dependent "directions" cannot all be single samples: distrust them
    return out


def pattern_margin(
    pre_w: np.ndarray, pre_b: np.ndarray, active: np.ndarray, inactive: np.ndarray
) -> float:
    """Largest margin t such that some p gives pre_w p + pre_b >= t on ``active`` neurons
    and <= -t on ``inactive`` ones (rows normalised, so t is a distance).  t < 0: infeasible."""
    norms = np.linalg.norm(pre_w, axis=1)
    norms[norms == 0] = 1.0
    sign = np.where(active, -1.0, 1.0)[:, None]
    rows = np.flatnonzero(active | inactive)
    a_all = np.hstack([sign * pre_w / norms[:, None], np.ones((len(norms), 1))])
    b_all = sign[:, 0] * -pre_b / norms
    c = np.zeros(pre_w.shape[1] + 1)
    c[-1] = -1.0
    bounds = [(None, None)] * pre_w.shape[1] + [(None, 1.0)]
    # A random tenth of the constraints rejects most blends at a fraction of the cost.
    subset = np.random.default_rng(len(rows)).permutation(rows)[: max(50, len(rows) // 10)]
    margin = np.inf
    for part in (subset, rows):
        res = linprog(c, A_ub=a_all[part], b_ub=b_all[part], bounds=bounds, method="highs")
        margin = float(res.x[-1]) if res.status == 0 else -np.inf
        if margin < 0:
            break
    return margin


def _refine_candidate(
    unit_basis: np.ndarray, q: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Re-fit q on all rows it makes zero; None if those rows leave a 2-D null space.

    The rows inactive for two samples u, v are orthogonal to both q_u and q_v, so a draw from
    them yields an arbitrary blend in span(q_u, q_v) with ~25% zeros.  A true column's zero
    rows span B-1 dimensions, a blend's only B-2: the second-smallest singular value tells.
    """
    ratio = 1.0
    for _ in range(3):
        zero = np.flatnonzero(np.abs(unit_basis @ q) < ZERO_TOL)
        if len(zero) < len(q):
            return None
        q, ratio = null_vector(unit_basis[zero])
        # Trim rows that are only nearly zero (a slightly blended q admits a few active rows).
        resid = np.abs(unit_basis[zero] @ q)
        keep = zero[resid <= 20.0 * np.median(resid) + 1e-12]
        if len(keep) >= len(q) and len(keep) < len(zero):
            q, ratio = null_vector(unit_basis[keep])
    return (q, np.abs(unit_basis @ q)) if ratio < 1e-3 else None


def search(
    unit_basis: np.ndarray,
    pre_w: np.ndarray,
    pre_b: np.ndarray,
    alive: np.ndarray,
    deadline: float,
    max_samples: int,
    seed: int = 0,
    batch_trials: int = 512,
) -> SamplingOutcome:
    """Sample null vectors until B independent, LP-feasible sparse columns of Q are found.

    ``unit_basis``: rows of L (live neurons) scaled to unit norm.  ``pre_w``/``pre_b``: every
    neuron's pre-activation as an affine function of the dual coordinates p (see spear.py).
    """
    m, b = unit_basis.shape
    rng = np.random.default_rng(seed)
    known = twin_directions(unit_basis)
    # Rows already explained by known directions add no constraint: do not draw them.
    if len(known):
        basis_k, _ = np.linalg.qr(known.T)
        resid = np.linalg.norm(unit_basis - (unit_basis @ basis_k) @ basis_k.T, axis=1)
        usable = np.flatnonzero(resid > 1e-6)
    else:
        usable = np.arange(m)
    found: list[np.ndarray] = []
    found_zeros: list[int] = []
    zero_floor = 0.0
    rejected_dirs: list[np.ndarray] = []
    settled: set[int] = set()
    samples = 0
    dead = ~alive
    # A true column zeroes 30-60% of the rows; a wrong one only the rows it was built from.
    n_extra = max(8, len(usable) // 100)
    while len(found) < b and samples < max_samples and time.monotonic() < deadline:
        # Which column kinds are still missing: one per known direction (drop it from the
        # constraints to find its column), and the columns of the unknown samples (-1).
        arr = np.array(found).reshape(-1, b)
        hits = np.abs(arr @ known.T) > 1e-6 if len(known) else np.zeros((len(arr), 0), bool)
        todo = [k for k in range(len(known)) if not hits[:, k].any()]
        if (~hits.any(axis=1)).sum() < b - len(known):
            todo.append(-1)
        todo = [k for k in todo if k not in settled]
        if not todo:
            break
        drop = todo[rng.integers(len(todo))]
        fixed = known if drop < 0 else np.delete(known, drop, axis=0)
        n_draw = b - 1 - len(fixed)
        if n_draw > len(usable):
            break
        if n_draw == 0:
            settled.add(drop)  # its single, deterministic candidate is examined below
        # With no row to draw the candidate is determined by the known directions alone.
        trials = batch_trials if n_draw else 1
        need = n_draw + n_extra if n_draw else 0
        picks = np.argsort(rng.random((trials, len(usable))), axis=1)[:, :n_draw]
        cons = unit_basis[usable[picks]]
        if len(fixed):
            cons = np.concatenate([np.broadcast_to(fixed, (trials, *fixed.shape)), cons], 1)
        q_full, _ = np.linalg.qr(np.swapaxes(cons, 1, 2), mode="complete")
        cands = q_full[:, :, -1]
        samples += trials
        n_zero = (np.abs(unit_basis[usable] @ cands.T) < ZERO_TOL).sum(0)
        # True columns have the most zeros; blends of several samples fewer.  Examine the
        # sparsest candidates first and spend at most a few LPs per batch on them.
        order = np.argsort(-n_zero)
        lp_left = LP_PER_BATCH
        for t in order[n_zero[order] >= need]:
            if time.monotonic() > deadline or lp_left == 0:
                break
            refined = _refine_candidate(unit_basis, cands[t])
            if refined is None:
                continue
            q, resid = refined
            n_zero_q = int((resid < ZERO_TOL).sum())
            if (resid[usable] < ZERO_TOL).sum() < need or n_zero_q < zero_floor:
                continue
            if any(abs(q @ f) > 1.0 - 1e-6 for f in found) or any(
                abs(q @ f) > 1.0 - 1e-6 for f in rejected_dirs
            ):
                continue
            lp_left -= 1
            active = np.zeros(len(alive), bool)
            inactive = dead.copy()
            active[alive] = resid > ACTIVE_TOL
            inactive[alive] = resid < ZERO_TOL
            if pattern_margin(pre_w, pre_b, active, inactive) < -1e-9:
                rejected_dirs.append(q)
                continue
            found.append(q)
            found_zeros.append(n_zero_q)
            if len(found_zeros) >= 2:
                # Inactivity rates of true columns are alike (here 0.38-0.52 of the neurons);
                # blends of several samples zero only the intersection (~0.55-0.7 as many).
                zero_floor = BLEND_ZERO_FRACTION * float(np.median(found_zeros))
            if len(found) >= b:
                break
    return SamplingOutcome(np.array(found).reshape(-1, b), samples, len(known), len(rejected_dirs))
