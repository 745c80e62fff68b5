"""Layer 2 for causal decoders: grow the sequences one position at a time.

A prefix extended by a candidate token is kept when block 0's output at the new position,
normalised by block 1's input norm, lies in the span of block 1's projection gradient (DAGER).
Causal attention means that output depends on the prefix and the new token only, so each step
needs one token's attention over cached keys and values, not a forward pass over the prefix.
Block 0's feed-forward input, available before the MLP, is tested first against the span of the
first feed-forward weight's gradient: the same consistency test, and it spares the MLP for most
candidate pairs.

Each test's threshold is calibrated on all distances seen so far at that stage (pooled over
positions) plus a few decoy tokens per position that layer 1 rejected, so that a position where
every candidate is true still has rejected values to measure the gap against.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .arch import Architecture
from .calibrate import Cut, widest_gap
from .result import LayerReport
from .span import Span

__all__ = ["Extension", "extend_sequences", "sequence_states"]


@dataclass
class _Beam:
    tokens: Tensor  # (m, p) token ids
    keys: Tensor  # (m, p, Hkv, hd) block-0 keys, positions applied
    values: Tensor  # (m, p, Hkv, hd)
    worst: Tensor  # (m,) largest layer-2 distance along the prefix

    @property
    def size(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class _NewTokens:
    ids: Tensor  # (n,)
    residual: Tensor  # (n, d)
    x: Tensor  # (n, d) normalised block-0 input
    q: Tensor  # (n, H, hd)
    k: Tensor  # (n, Hkv, hd)
    v: Tensor  # (n, Hkv, hd)


@dataclass
class _Calibrator:
    """Pooled widest-gap threshold of one stage, updated position by position."""

    report: LayerReport
    per_position: int  # most true candidates at one position (with slack for ties)
    pool: list[Tensor] = field(default_factory=list)
    accepted: list[Tensor] = field(default_factory=list)
    rejected: list[Tensor] = field(default_factory=list)
    max_accept: int = 0
    cut: Cut | None = None

    def update(self, dist: Tensor, decoys: Tensor) -> Tensor | None:
        """Fold in one position's distances; return its acceptance mask (None: no gap yet)."""
        finite = dist[dist.isfinite()]
        self.pool += [finite, decoys]
        self.max_accept += min(self.per_position, finite.numel())
        self.cut = widest_gap(torch.cat(self.pool), max_accept=max(1, self.max_accept))
        if self.cut is None:
            return None
        keep = dist < self.cut.threshold
        self.accepted.append(dist[keep])
        self.rejected += [dist[~keep & dist.isfinite()], decoys]
        return keep

    def finish(self) -> None:
        if self.cut is not None:
            self.report.record(self.cut, torch.cat(self.accepted), torch.cat(self.rejected))


@dataclass
class Extension:
    """Outcome of the layer-2 search.

    Attributes:
        sequences: complete sequences (without end token), longest and best first.
        scores: largest layer-2 distance along each sequence.
        failure: why the search stopped without a trustworthy answer, else None.
    """

    sequences: list[list[int]]
    scores: list[float]
    failure: str | None = None


def _new_tokens(arch: Architecture, ids: Tensor, position: int) -> _NewTokens:
    residual, x = arch.layer1_inputs(ids, position)
    q, k, v = arch.qkv(x, position)
    return _NewTokens(ids, residual, x, q, k, v)


def _after_attention(
    arch: Architecture, beam: _Beam, new: _NewTokens, *, pair_chunk: int
) -> Tensor:
    """Block 0's stream after attention for every (prefix, new token) pair: (m, n, d)."""
    m, n = beam.size, new.ids.numel()
    hkv, hd = arch.n_kv_heads, arch.head_dim
    group = arch.n_heads // hkv
    out = torch.empty(m, n, new.residual.shape[-1])
    step = max(1, pair_chunk // max(m, 1))
    for s in range(0, n, step):
        sl = slice(s, s + step)
        q = new.q[sl].reshape(-1, hkv, group, hd)  # (c, Hkv, G, hd)
        k, v = new.k[sl], new.v[sl]  # (c, Hkv, hd)
        own = torch.einsum("ckgd,ckd->ckg", q, k)[None, ..., None].expand(m, -1, -1, -1, 1)
        past = torch.einsum("ckgd,mpkd->mckgp", q, beam.keys)
        attn = (torch.cat([past, own], dim=-1) * arch.attn_scale).softmax(dim=-1)
        ctx = torch.einsum("mckgp,mpkd->mckgd", attn[..., :-1], beam.values)
        ctx = (ctx + attn[..., -1:] * v[None, :, :, None, :]).reshape(m, q.shape[0], -1)
        res = new.residual[sl].expand(m, -1, -1)
        out[:, sl] = arch.after_attention(res, new.x[sl].expand(m, -1, -1), ctx)
    return out


def _decoys(vocab: int, exclude: Tensor, n: int, gen: torch.Generator) -> Tensor:
    """Up to ``n`` random token ids outside ``exclude`` (layer-1 rejects), for calibration."""
    draw = torch.randint(vocab, (4 * n + exclude.numel(),), generator=gen)
    draw = draw[~torch.isin(draw, exclude)].unique()
    return draw[torch.randperm(draw.numel(), generator=gen)[:n]]


@torch.no_grad()
def extend_sequences(
    arch: Architecture,
    span: Span,
    token_sets: list[Tensor],
    *,
    num_sequences: int,
    n_positions: int,
    report: LayerReport,
    max_prefixes: int,
    prefilter: tuple[Span, LayerReport] | None = None,
    n_decoys: int = 16,
    pair_chunk: int = 4096,
    seed: int = 0,
) -> Extension:
    """Grow sequences through positions 0 .. n_positions - 1.

    Args:
        span: layer-2 span (block 1's input).
        token_sets: layer-1 candidates per position (a single set for rotary models).
        num_sequences: sequences in the batch; at most that many prefixes per position are true,
            which bounds how many pairs the calibration may accept.
        n_positions: positions that received a gradient (seq_len - 1 for a causal LM).
        report: filled with the layer-2 threshold and separation.
        max_prefixes: give up (candidate explosion) when more prefixes survive a position.
        prefilter: the ffn span and its report; pairs failing it skip the MLP and layer 2.
        n_decoys: layer-1 rejects added per position as known-false calibration points.
    """
    gen = torch.Generator().manual_seed(seed)
    hkv, hd = arch.n_kv_heads, arch.head_dim
    beam = _Beam(
        torch.empty(1, 0, dtype=torch.long),
        torch.empty(1, 0, hkv, hd),
        torch.empty(1, 0, hkv, hd),
        torch.zeros(1, dtype=torch.float64),
    )
    per_position = 2 * num_sequences  # as many again as can be true, for ties
    final = _Calibrator(report, per_position)
    first = None if prefilter is None else _Calibrator(prefilter[1], per_position)
    done: list[tuple[list[int], float]] = []
    for p in range(n_positions):
        ids = token_sets[p] if arch.positional else token_sets[0]
        if ids.numel() == 0:
            break
        new = _new_tokens(arch, ids, p)
        h = _after_attention(arch, beam, new, pair_chunk=pair_chunk)  # (m, n, d)
        z = arch.ffn_input(h)
        live = torch.ones(h.shape[:2], dtype=torch.bool)
        if not arch.positional and p > 0:
            # With rotary positions a run of one token (t t ... t) gives block 0 the same output
            # as t alone (identical values; only the weights move), so it always passes: drop it.
            run = (beam.tokens == beam.tokens[:, :1]).all(dim=1, keepdim=True)
            live &= ~(run & (ids.unsqueeze(0) == beam.tokens[:, :1]))
        decoy_ids = _decoys(arch.vocab_size, ids, n_decoys, gen)
        decoy = _new_tokens(arch, decoy_ids, p)
        first_beam = _Beam(beam.tokens[:1], beam.keys[:1], beam.values[:1], beam.worst[:1])
        hd_ = _after_attention(arch, first_beam, decoy, pair_chunk=pair_chunk)[0]
        zd = arch.ffn_input(hd_)
        if first is not None:
            mid = _masked_distances(prefilter[0], z, live, pair_chunk)
            keep = first.update(mid, prefilter[0].distances(zd))
            if keep is None:
                return Extension([], [], "ffn prefilter: too few candidates to calibrate")
            live &= keep
        dist = _masked_distances(span, arch.layer2_input(h[live], z[live]), live, pair_chunk)
        keep = final.update(dist, span.distances(arch.layer2_input(hd_, zd)))
        if keep is None:
            return Extension([], [], "layer 2: too few candidates to calibrate a threshold")
        if p > 0:
            for i in (~keep.any(dim=1)).nonzero().flatten().tolist():
                done.append((beam.tokens[i].tolist(), float(beam.worst[i])))
        pi, ti = keep.nonzero(as_tuple=True)
        if pi.numel() > max_prefixes:
            final.finish()
            return Extension(
                [],
                [],
                f"layer 2: {pi.numel()} prefixes pass at position {p} "
                f"(limit {max_prefixes}); the span does not separate candidates",
            )
        beam = _Beam(
            torch.cat([beam.tokens[pi], ids[ti].unsqueeze(1)], dim=1),
            torch.cat([beam.keys[pi], new.k[ti].unsqueeze(1)], dim=1),
            torch.cat([beam.values[pi], new.v[ti].unsqueeze(1)], dim=1),
            torch.maximum(beam.worst[pi], dist[pi, ti]),
        )
        if beam.size == 0:
            break
    done += [(beam.tokens[i].tolist(), float(beam.worst[i])) for i in range(beam.size)]
    final.finish()
    if first is not None:
        first.finish()
    done.sort(key=lambda s: (-len(s[0]), s[1]))
    done = done[:num_sequences]
    return Extension([s for s, _ in done], [w for _, w in done])


def _masked_distances(span: Span, states: Tensor, live: Tensor, chunk: int) -> Tensor:
    """Distances laid out like ``live`` (m, n); inf where not live.

    ``states`` is either (m, n, d) for all pairs or (live.sum(), d) for the live ones only.
    """
    out = torch.full(live.shape, float("inf"), dtype=torch.float64)
    rows = states[live] if states.dim() == 3 else states
    if rows.shape[0]:
        out[live] = span.distances(rows, chunk_size=chunk)
    return out


@torch.no_grad()
def sequence_states(
    arch: Architecture, seqs: list[list[int]], n_positions: int
) -> dict[str, Tensor]:
    """layer1, ffn and layer2 states of the first ``n_positions`` tokens of each sequence.

    Returns (total tokens, d) tensors, for checking a recovery against the gradient.
    """
    out: dict[str, list[Tensor]] = {"layer1": [], "ffn": [], "layer2": []}
    hkv, hd = arch.n_kv_heads, arch.head_dim
    for seq in seqs:
        ids = torch.tensor(seq[:n_positions], dtype=torch.long)
        beam = _Beam(
            ids[:0][None],
            torch.empty(1, 0, hkv, hd),
            torch.empty(1, 0, hkv, hd),
            torch.zeros(1, dtype=torch.float64),
        )
        for p in range(ids.numel()):
            new = _new_tokens(arch, ids[p : p + 1], p)
            h = _after_attention(arch, beam, new, pair_chunk=16)[0]
            z = arch.ffn_input(h)
            out["layer1"].append(new.x)
            out["ffn"].append(z)
            out["layer2"].append(arch.layer2_input(h, z))
            beam = _Beam(
                ids[: p + 1][None],
                torch.cat([beam.keys, new.k[None]], 1),
                torch.cat([beam.values, new.v[None]], 1),
                beam.worst,
            )
    return {k: torch.cat(v) if v else torch.empty(0) for k, v in out.items()}
