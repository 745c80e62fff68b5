"""The search for one client's participation column near the sums' column space.

A client's column p (0/1 per round) lies, up to noise, in the column space spanned by the
orthonormal basis Q of the sums' leading singular subspace, and it meets the client's counts.
The search minimises the squared distance to that space, ``f(p) = |p - Q Q^T p|^2`` (the
objective of Lam et al.'s binary quadratic program), over count-feasible binary vectors:

1. starts: the least-squares fit of the subspace to the counts, random vectors, and (for hard
   clients) the LP relaxation of ``min |p - Q a|_1``; each rounded to the counts;
2. alternating projection: onto the subspace, then back to the nearest count-feasible binary
   vector, until it stops changing;
3. local search: the best swap of a taken and a skipped round inside one counted interval (which
   keeps every count) or flip of an uncounted round, while any lowers f.

The best local minimum is the column; the runner-up, the best count-feasible vector other than it
among the distinct minima found and the column's whole swap-and-flip neighbourhood, is the
evidence of how unique it is (``Column.separation``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import linprog


@dataclass(frozen=True)
class Column:
    """One client's column in one chunk, and the evidence for it."""

    p: np.ndarray  # 0/1 per round
    residual: float  # f(p): squared distance to the column space
    runner_up: float  # f of the best other count-feasible vector found
    runner_up_distance: int  # rounds in which the runner-up differs
    method: str  # how p was found
    flip_cost: float = 1.0  # 1 - n/T: what changing one round costs on exact sums
    note: str = (
        ""  # why the column is not to be trusted whatever its separation (a solver time-out)
    )

    @property
    def separation(self) -> float:
        """How much worse the runner-up fits per round it changes, as a fraction of what a change
        costs on exact sums (``1 - n/T``, the mean of ``diag(I - Q Q^T)``): about 1 for a column
        the data pins, 0 for one the runner-up fits as well (inf: no alternative found). A ratio of
        the two fits would shrink as a chunk's noise residual grows with its length; this does
        not."""
        if not np.isfinite(self.runner_up) or self.runner_up_distance == 0:
            return float("inf")
        return float((self.runner_up - self.residual) / (self.runner_up_distance * self.flip_cost))


class ColumnSearch:
    """Local search for one client's column in one chunk (basis Q, the client's groups)."""

    def __init__(self, q: np.ndarray, gid: np.ndarray, counts: np.ndarray) -> None:
        self.q, self.gid, self.counts = q, gid, counts
        self.t = q.shape[0]
        self.diag = 1.0 - np.einsum("ij,ij->i", q, q)  # M_ii of M = I - Q Q^T
        self.free = np.flatnonzero(gid < 0)
        sizes = np.bincount(gid[gid >= 0], minlength=len(counts))
        width = int(sizes.max()) if len(sizes) else 0
        self.members = np.full(
            (len(counts), width), -1, dtype=np.int64
        )  # rounds of each group, padded
        fill = np.zeros(len(counts), dtype=np.int64)
        for r in np.flatnonzero(gid >= 0):
            g = gid[r]
            self.members[g, fill[g]] = r
            fill[g] += 1
        safe = np.where(self.members >= 0, self.members, 0)
        self.gram = np.einsum("gai,gbi->gab", q[safe], q[safe])  # q_a . q_b within each group
        self.valid = self.members >= 0

    def f(self, p: np.ndarray) -> float:
        r = p - self.q @ (self.q.T @ p)
        return float(r @ r)

    def round(self, v: np.ndarray) -> np.ndarray:
        """The count-feasible 0/1 vector maximising <v, p>: the top-count rounds of each group,
        and the uncounted rounds where v > 1/2."""
        p = np.zeros(self.t)
        order = np.lexsort((-v, self.gid))
        g_sorted = self.gid[order]
        starts = np.searchsorted(g_sorted, g_sorted, side="left")
        rank = np.arange(self.t) - starts
        counted = g_sorted >= 0
        limit = np.append(self.counts, 0)[np.where(counted, g_sorted, len(self.counts))]
        take = counted & (rank < limit)
        p[order[take]] = 1.0
        p[self.free] = (v[self.free] > 0.5).astype(np.float64)
        return p

    def _moves(self, p: np.ndarray, mp: np.ndarray) -> tuple[float, tuple[int, ...]]:
        """The best move and its change of f: a swap inside a group, or a flip of a free round."""
        best, move = np.inf, ()
        if self.members.size:
            r = np.where(self.valid, self.members, 0)
            on = self.valid & (p[r] == 1)
            off = self.valid & (p[r] == 0)
            out_cost = -2 * mp[r] + self.diag[r]  # taking a round out
            in_cost = 2 * mp[r] + self.diag[r]  # putting one in
            delta = out_cost[:, :, None] + in_cost[:, None, :] + 2 * self.gram
            delta = np.where(on[:, :, None] & off[:, None, :], delta, np.inf)
            k = int(np.argmin(delta))
            g, a, b = np.unravel_index(k, delta.shape)
            if delta[g, a, b] < best:
                best, move = float(delta[g, a, b]), (int(r[g, a]), int(r[g, b]))
        if len(self.free):
            fr = self.free
            flip = np.where(p[fr] == 1, -2 * mp[fr], 2 * mp[fr]) + self.diag[fr]
            i = int(np.argmin(flip))
            if flip[i] < best:
                best, move = float(flip[i]), (int(fr[i]),)
        return best, move

    def descend(self, p: np.ndarray) -> np.ndarray:
        """Alternating projection, then best-improvement local search, from ``p``."""
        for _ in range(100):
            nxt = self.round(self.q @ (self.q.T @ p))
            if np.array_equal(nxt, p):
                break
            p = nxt
        p = p.copy()
        mp = p - self.q @ (self.q.T @ p)
        for _ in range(10 * self.t):
            delta, move = self._moves(p, mp)
            if not move or delta >= -1e-12:
                break
            e = np.zeros(self.t)
            for i in move:
                e[i] = -1.0 if p[i] == 1 else 1.0
            p += e
            mp += e - self.q @ (self.q.T @ e)
        return p

    def lp_start(self, a_rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """The LP relaxation of ``min |p - Q a|_1`` over the counts, 0 <= p <= 1."""
        t, n = self.q.shape
        eye = np.eye(t)
        c = np.concatenate([np.zeros(t + n), np.ones(t)])
        a_ub = np.block([[eye, -self.q, -eye], [-eye, self.q, -eye]])
        a_eq = np.hstack([a_rows, np.zeros((len(a_rows), n + t))]) if len(a_rows) else None
        bounds = [(0, 1)] * t + [(None, None)] * n + [(0, None)] * t
        res = linprog(
            c,
            A_ub=a_ub,
            b_ub=np.zeros(2 * t),
            A_eq=a_eq,
            b_eq=counts if len(a_rows) else None,
            bounds=bounds,
            method="highs",
        )
        return res.x[:t] if res.x is not None else np.full(t, 0.5)

    def solve(
        self,
        *,
        starts: int,
        seed: int,
        a_rows: np.ndarray,
        counts: np.ndarray,
        lp: bool = False,
        given: tuple[str, np.ndarray] | None = None,
    ) -> Column:
        """The best column found from the starts (and ``given``: a (method, column) found
        otherwise, e.g. by a solver), with its runner-up."""
        rng = np.random.default_rng(seed)
        firsts = []
        if given is not None:
            firsts.append((given[0], given[1].astype(np.float64)))
        if len(a_rows):
            fit = np.linalg.lstsq(a_rows @ self.q, counts, rcond=None)[0]
            firsts.append(("search", self.round(self.q @ fit)))
        if lp:
            firsts.append(
                ("search+lp", self.round(self.lp_start(a_rows, counts) + 1e-9 * rng.random(self.t)))
            )
        firsts += [("search", self.round(rng.random(self.t))) for _ in range(starts)]
        minima: dict[bytes, tuple[float, np.ndarray, str]] = {}
        for how, p0 in firsts:
            p = self.descend(p0)
            key = np.packbits(p.astype(bool)).tobytes()
            if key not in minima:
                minima[key] = (self.f(p), p, how)
        ranked = sorted(minima.values(), key=lambda m: m[0])
        f1, best, how = ranked[0]
        runner, dist = np.inf, 0
        if len(ranked) > 1:
            runner, dist = ranked[1][0], int(np.abs(ranked[1][1] - best).sum())
        step, move = self._moves(best, best - self.q @ (self.q.T @ best))
        if move and f1 + step < runner:
            runner, dist = f1 + step, len(move)
        return Column(best.astype(np.int64), f1, float(runner), dist, how, float(self.diag.mean()))
