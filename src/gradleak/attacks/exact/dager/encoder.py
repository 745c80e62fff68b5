"""Second stage for bidirectional encoders: search for whole sequences.

In an encoder every position's state after attention depends on the whole sequence, so sequences
cannot be grown left to right. Layer 1 gives the tokens at each position (the true ones plus
batch tokens implied by linear dependencies); DAGER's encoder search then scores complete
assignments, one token per position, by the distance of block 0's feed-forward inputs to the span
of the first feed-forward weight's gradient (see ``arch``). It enumerates the product of the
per-position sets when that fits the budget, as DAGER does. When it does not, DAGER samples at
random; here coordinate descent from random starts, followed by moves of two positions at once
from the best local minima, replaces the sampling. Measured on random-init BERT: a wrong token
shifts every position's distance about equally (attention mixes the sequence), so the objective
(mean log-distance) only funnels towards a true sequence from within a few positions of it; the
restarts find the funnel, the pair moves leave the local minima inside it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .arch import Architecture
from .calibrate import widest_gap
from .result import LayerReport
from .span import Span

__all__ = ["Search", "search_sequences", "sequence_states"]


@dataclass
class Search:
    """Outcome of the encoder search (same meaning as ``decoder.Extension``)."""

    sequences: list[list[int]]
    scores: list[float]
    failure: str | None = None
    evaluated: int = 0


class _Scorer:
    """Layer-2 distances of complete assignments, with per-position tables precomputed."""

    def __init__(
        self, arch: Architecture, span: Span | None, sets: list[Tensor], chunk: int
    ) -> None:
        self.arch, self.span, self.sets, self.chunk = arch, span, sets, chunk
        sizes = torch.tensor([s.numel() for s in sets])
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)[:-1]])
        xs, qs, ks, vs = [], [], [], []
        for p, ids in enumerate(sets):
            _, x = arch.layer1_inputs(ids, p)
            q, k, v = arch.qkv(x, p)
            xs.append(x), qs.append(q), ks.append(k), vs.append(v)
        self.x, self.q = torch.cat(xs), torch.cat(qs)
        self.k, self.v = torch.cat(ks), torch.cat(vs)

    def __call__(self, assign: Tensor) -> Tensor:
        """Distances (N, L) of assignments (N, L) (indices into each position's set)."""
        out = torch.empty(assign.shape, dtype=torch.float64)
        for s in range(0, assign.shape[0], self.chunk):
            y = self.states(assign[s : s + self.chunk])
            n, length = y.shape[:2]
            out[s : s + n] = self.span.distances(y.reshape(n * length, -1)).reshape(n, length)
        return out

    def states(self, assign: Tensor) -> Tensor:
        """ffn states (N, L, d) of assignments (N, L)."""
        a = self.arch
        rows = self.offsets + assign
        x, q, k, v = self.x[rows], self.q[rows], self.k[rows], self.v[rows]
        attn = (torch.einsum("nlhd,nmhd->nhlm", q, k) * a.attn_scale).softmax(dim=-1)
        ctx = torch.einsum("nhlm,nmhd->nlhd", attn, v).reshape(*x.shape[:2], -1)
        return a.ffn_input(a.after_attention(x, x, ctx))

    def tokens(self, assign: Tensor) -> list[int]:
        return [int(self.sets[p][i]) for p, i in enumerate(assign.tolist())]


def _objective(dist: Tensor) -> Tensor:
    """Mean log-distance over positions: the score of a sequence, and what the search minimises.

    A wrong token moves every position (attention mixes the sequence), while a true sequence can
    still have one position whose state got little gradient and sits further from the span; the
    geometric mean separates the two where the worst position would not.
    """
    return dist.clamp_min(1e-12).log().mean(dim=-1)


@torch.no_grad()
def search_sequences(
    arch: Architecture,
    span: Span,
    token_sets: list[Tensor],
    *,
    num_sequences: int,
    report: LayerReport,
    max_evaluations: int = 200_000,
    restarts: int | None = None,
    stop_ratio: float = 10.0,
    distinct_fraction: float = 0.3,
    chunk: int = 512,
    seed: int = 0,
) -> Search:
    """Find up to ``num_sequences`` sequences, one token per position from ``token_sets``.

    Args:
        token_sets: layer-1 candidates for every position (all positions of an encoder get a
            gradient).
        report: filled with the layer-2 threshold and separation.
        max_evaluations: sequences scored at most (about 10k per second at d = 128, L = 16, one
            thread). When the product of the sets fits, it is enumerated (exact, as in DAGER).
        restarts: random starts per round of coordinate descent (default 4 x num_sequences).
        stop_ratio: stop early once ``num_sequences`` sequences are separated from all others
            by at least this distance ratio.
        distinct_fraction: a sequence differing from a better one in fewer than this share of
            positions is a variant of it, not a candidate (DAGER's distinctness rule); variants
            are left out of the calibration, where they would crowd the true sequences.
    """
    if any(s.numel() == 0 for s in token_sets):
        return Search([], [], "layer 1 found no token at some position")
    scorer = _Scorer(arch, span, token_sets, chunk)
    sizes = [s.numel() for s in token_sets]
    distinct = max(1, math.ceil(distinct_fraction * len(sizes)))
    seen: dict[tuple[int, ...], float] = {}
    used = [0]

    def evaluate(assign: Tensor) -> Tensor:
        used[0] += assign.shape[0]
        if used[0] > max_evaluations:
            raise _OutOfBudget
        dist = scorer(assign)
        for row, score in zip(assign.tolist(), _objective(dist).exp().tolist()):
            seen[tuple(row)] = score
        return dist

    def complete() -> bool:
        found, cut, _, _ = _accepted(seen, num_sequences, distinct)
        return len(found) >= num_sequences and cut is not None and cut.ratio >= stop_ratio

    total = math.prod(sizes)
    try:
        if total <= max_evaluations:
            combos = itertools.product(*[range(s) for s in sizes])
            while batch := list(itertools.islice(combos, 8 * chunk)):
                evaluate(torch.tensor(batch, dtype=torch.long).reshape(-1, len(sizes)))
        else:
            gen = torch.Generator().manual_seed(seed)
            n_starts = restarts or 4 * num_sequences
            free = [p for p, s in enumerate(sizes) if s > 1]
            minima: dict[tuple[int, ...], float] = {}
            while not complete():
                assign = torch.stack(
                    [torch.randint(s, (n_starts,), generator=gen) for s in sizes], dim=1
                )
                _descend(assign, free, sizes, evaluate)
                minima.update({tuple(r): seen[tuple(r)] for r in assign.tolist()})
                # Minima near a true sequence are a few positions off: move pairs of positions
                # from the best ones not yet accepted, until nothing improves.
                found, cut, _, _ = _accepted(seen, num_sequences, distinct)
                done = {a for a, _ in found} if cut and cut.ratio >= stop_ratio else set()
                best = sorted((k for k in minima if k not in done), key=minima.get)
                if best:
                    _escape(
                        torch.tensor(best[: 2 * num_sequences]), free, sizes, evaluate, minima, seen
                    )
    except _OutOfBudget:
        pass
    found, cut, acc, rej = _accepted(seen, num_sequences, distinct)
    if cut is None:
        return Search([], [], "layer 2: too few sequences scored to calibrate", len(seen))
    report.record(cut, acc, rej)
    found = found[:num_sequences]
    return Search(
        [scorer.tokens(torch.tensor(a)) for a, _ in found], [w for _, w in found], None, len(seen)
    )


class _OutOfBudget(Exception):
    """Raised by the scorer when the search has used its evaluation budget."""


def _descend(assign: Tensor, free: list[int], sizes: list[int], evaluate) -> None:
    """Coordinate descent in place: set each free position to its best token until stable."""
    n = assign.shape[0]
    for _ in range(4 * len(sizes)):
        changed = False
        for p in free:
            s = sizes[p]
            cand = assign.repeat_interleave(s, dim=0)
            cand[:, p] = torch.arange(s).repeat(n)
            best = _objective(evaluate(cand)).reshape(n, s).argmin(dim=1)
            changed |= bool((best != assign[:, p]).any())
            assign[:, p] = best
        if not changed:
            return


def _escape(assign, free, sizes, evaluate, minima, seen, max_moves: int = 6) -> None:
    """Best pair-of-positions move, then coordinate descent, while the objective improves."""
    for _ in range(max_moves):
        score = torch.tensor([seen[tuple(r)] for r in assign.tolist()], dtype=torch.float64)
        improved = torch.zeros(assign.shape[0], dtype=torch.bool)
        for i, j in itertools.combinations(free, 2):
            si, sj = sizes[i], sizes[j]
            cand = assign.repeat_interleave(si * sj, dim=0)
            cand[:, i] = torch.arange(si).repeat_interleave(sj).repeat(assign.shape[0])
            cand[:, j] = torch.arange(sj).repeat(si * assign.shape[0])
            obj = _objective(evaluate(cand)).exp().reshape(assign.shape[0], si * sj)
            val, arg = obj.min(dim=1)
            better = val < score * (1 - 1e-9)
            if better.any():
                rows = cand.reshape(assign.shape[0], si * sj, -1)[
                    torch.arange(assign.shape[0]), arg
                ]
                assign[better] = rows[better]
                score[better] = val[better]
                improved |= better
        if not improved.any():
            return
        _descend(assign, free, sizes, evaluate)
        for row in assign.tolist():
            minima[tuple(row)] = seen[tuple(row)]


def _accepted(seen: dict[tuple[int, ...], float], num_sequences: int, distinct: int):
    """Distinct sequences below the calibrated threshold, best first, with the cut and evidence.

    Sequences are taken best first, skipping any within ``distinct`` - 1 changed positions of
    one already taken; the threshold is the widest gap among the first num_sequences + 1.
    """
    keys = list(seen)
    if not keys:
        return [], None, torch.empty(0), torch.empty(0)
    scores = torch.tensor([seen[k] for k in keys], dtype=torch.float64)
    order = torch.argsort(scores)
    table = torch.tensor(keys, dtype=torch.long)
    kept: list[int] = []
    for i in order.tolist():
        if kept and bool(((table[kept] != table[i]).sum(dim=1) < distinct).any()):
            continue
        kept.append(i)
        if len(kept) > 4 * num_sequences + 16:
            break
    values = scores[kept]
    cut = widest_gap(values, max_accept=num_sequences)
    if cut is None:
        return [], None, values[:0], values[:0]
    below = values < cut.threshold
    found = [(keys[i], float(scores[i])) for i, b in zip(kept, below.tolist()) if b]
    return found, cut, values[below], values[~below]


@torch.no_grad()
def sequence_states(arch: Architecture, seqs: list[list[int]]) -> dict[str, Tensor]:
    """layer1 and ffn states of every token of each sequence, (total tokens, d)."""
    if not seqs:
        return {"layer1": torch.empty(0), "ffn": torch.empty(0)}
    table = torch.tensor(seqs, dtype=torch.long)
    sets = [table[:, p].unique() for p in range(table.shape[1])]
    assign = torch.stack(
        [torch.searchsorted(sets[p], table[:, p].contiguous()) for p in range(len(sets))], 1
    )
    scorer = _Scorer(arch, None, sets, chunk=len(seqs))  # no span: states only
    x = scorer.x[scorer.offsets + assign]
    return {
        "layer1": x.reshape(-1, x.shape[-1]),
        "ffn": scorer.states(assign).reshape(-1, x.shape[-1]),
    }
