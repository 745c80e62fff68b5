"""Layer 1: which tokens occur at which position, from block 0's projection gradient.

Every vocabulary token is passed through the embedding (plus the position's embedding where
positions are learned) and block 0's input norm; those whose result lies in the gradient's input
span were in the batch. With rotary positions the input of block 0 does not depend on the
position, so a single set of tokens comes out.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .arch import AffineEmbedding, Architecture
from .calibrate import Cut, widest_gap
from .result import LayerReport, empty, split_by
from .span import Span

__all__ = ["scan_vocabulary", "select_tokens"]


@torch.no_grad()
def scan_vocabulary(
    arch: Architecture, span: Span, positions: list[int], *, keep: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """The ``keep`` smallest distances (ascending) and their token ids, per position.

    The vocabulary is processed in chunks of ``chunk_size`` tokens, so memory stays at a few
    chunk x d buffers whatever the vocabulary size. When layer 1 is LayerNorm(table + offset)
    and the span is not behind a LoRA map, the projections of the whole table are computed once
    and each position costs O(V d) instead of O(V d rank) (``_AffineScan``).

    Returns:
        (distances, token ids), both (len(positions), keep).
    """
    vocab = arch.vocab_size
    keep = min(keep, vocab)
    affine = arch.layer1_affine() if span.transform is None else None
    fast = _AffineScan(affine, span, chunk_size) if affine is not None else None
    all_ids = torch.arange(vocab)
    vals, ids = [], []
    for p in positions:
        if fast is not None:
            dist = fast.screen(p)
            small = (dist < fast.refine_below).nonzero().flatten()
            if small.numel():  # exact float64 distances wherever acceptance is decided
                _, x = arch.layer1_inputs(small, p)
                dist[small] = span.distances(x, chunk_size=chunk_size)
        else:
            dist = torch.empty(vocab, dtype=torch.float64)
            for start in range(0, vocab, chunk_size):
                chunk = all_ids[start : start + chunk_size]
                _, x = arch.layer1_inputs(chunk, p)
                dist[start : start + chunk.numel()] = span.distances(x, chunk_size=chunk_size)
        v, i = torch.topk(dist, keep, largest=False, sorted=True)
        vals.append(v)
        ids.append(i)
    return torch.stack(vals), torch.stack(ids)


class _AffineScan:
    """Distances of LayerNorm(table[t] + offset_p) to a span, for all t, without forming them.

    With u = gamma * (e - mean(e)), x = u / s + beta (s = sqrt(var(e) + eps)), and a basis Q of
    the span (or of its complement, whichever is smaller), x Q = (T_g Q + (gamma o) Q
    - mean * gamma Q) / s + beta Q, where T_g Q = (gamma * table) Q is computed once; |x|^2,
    mean and var follow from a few per-position matrix-vector products. Screening precision is
    float32; callers recompute small distances exactly.
    """

    refine_below = 0.1

    def __init__(self, affine: AffineEmbedding, span: Span, chunk_size: int) -> None:
        self.a = affine
        self.complement = span.complement.shape[1] <= span.rank
        q = span.complement if self.complement else span.basis
        self.q = q  # float64 (d, k)
        t = affine.table.to(torch.float32)
        g = affine.gamma.to(torch.float64)
        b = affine.beta.to(torch.float64)
        q32 = q.to(torch.float32)
        # Per-token statistics, chunked so that no (V, d) temporary is made.
        weights = torch.stack([g, g * g, g * b, torch.ones_like(g)], dim=1)  # (d, 4)
        proj, lin, sq = [], [], []
        for s in range(0, t.shape[0], chunk_size):
            c = t[s : s + chunk_size]
            proj.append((c * g.to(torch.float32)) @ q32)
            lin.append(c.to(torch.float64) @ weights)  # gamma.t, gamma^2.t, gamma beta.t, sum t
            c2 = c.to(torch.float64).pow(2)
            sq.append(torch.stack([c2.sum(dim=1), c2 @ (g * g)], dim=1))  # |t|^2, gamma^2.t^2
        self.proj = torch.cat(proj)  # (V, k) float32
        lin, sq = torch.cat(lin), torch.cat(sq)
        self.t = t
        self.g, self.b = g, b
        self.g2_t, self.gb_t, self.sum_t = lin[:, 1], lin[:, 2], lin[:, 3]
        self.sq_t, self.g2_sq_t = sq[:, 0], sq[:, 1]
        self.gq32, self.bq32 = (g @ q).to(torch.float32), (b @ q).to(torch.float32)

    def screen(self, position: int) -> Tensor:
        """Approximate distances (V,) at ``position`` (V x k work in float32, in place)."""
        a, g, b = self.a, self.g, self.b
        d = self.t.shape[1]
        o = a.offsets[position].to(torch.float64)
        t_o = (self.t @ o.to(torch.float32)).to(torch.float64)
        t_g2o = (self.t @ (g * g * o).to(torch.float32)).to(torch.float64)
        mean = (self.sum_t + o.sum()) / d
        var = (self.sq_t + 2 * t_o + o.pow(2).sum()) / d - mean.pow(2)
        s = (var.clamp_min(0) + a.eps).sqrt()
        g2 = g * g
        sum_g2e2 = self.g2_sq_t + 2 * t_g2o + (g2 * o * o).sum()
        sum_g2e = self.g2_t + (g2 * o).sum()
        u2 = sum_g2e2 - 2 * mean * sum_g2e + mean.pow(2) * g2.sum()
        bu = (self.gb_t + (g * b * o).sum()) - mean * (g * b).sum()
        x2 = u2 / s.pow(2) + 2 * bu / s + b.pow(2).sum()
        # coeff = (proj + (g o) Q - mean gQ) / s + bQ
        coeff = torch.addr(
            self.proj + ((g * o) @ self.q).to(torch.float32),
            mean.to(torch.float32),
            self.gq32,
            alpha=-1,
        )
        coeff.div_(s.to(torch.float32)[:, None]).add_(self.bq32)
        c2 = torch.linalg.vector_norm(coeff, dim=1).to(torch.float64).pow(2)
        if self.complement:
            return (c2 / x2).clamp_min(0).sqrt()
        return (1 - c2 / x2).clamp_min(0).sqrt()


def select_tokens(
    distances: Tensor, ids: Tensor, *, max_accept: int, report: LayerReport
) -> tuple[list[Tensor], Cut | None]:
    """Token sets per position, cut at the widest gap of the pooled distances.

    Args:
        distances, ids: output of ``scan_vocabulary``.
        max_accept: most (token, position) pairs that can be true, e.g. sequences x positions.
        report: filled with the threshold and the achieved separation.

    Returns:
        (token ids per position, best first; the cut, or None when no gap can be measured).
    """
    cut = widest_gap(distances.flatten(), max_accept=max_accept)
    if cut is None:
        return [ids.new_empty(0) for _ in range(ids.shape[0])], None
    accepted = distances < cut.threshold
    sets = [ids[p][accepted[p]] for p in range(ids.shape[0])]
    acc, rej = split_by(distances.flatten(), cut.threshold)
    # The scan kept only the smallest distances per position, so each row's first rejected
    # value is present whenever a row has any rejection; that is all the gap needs.
    report.record(cut, acc if acc.numel() else empty(), rej)
    return sets, cut
