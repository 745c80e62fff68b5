"""``recover``: DAGER-style exact recovery of a text batch from one client update."""

from __future__ import annotations

import math
import time
from typing import Literal

import torch
from torch import Tensor, nn

from .arch import Architecture, Projection, Stage, architecture_for
from .decoder import extend_sequences
from .decoder import sequence_states as decoder_states
from .encoder import search_sequences
from .encoder import sequence_states as encoder_states
from .layer1 import scan_vocabulary, select_tokens
from .result import LayerReport, Result
from .span import Span, default_rank_margin, input_space_gradient

__all__ = ["float32_noise", "recover", "stage_span"]


def stage_span(
    arch: Architecture,
    stage: Stage,
    gradient: dict[str, Tensor],
    *,
    rel_tol: float,
    noise: dict[str, float] | None = None,
) -> Span | str:
    """Span of the ``stage`` states from the gradients of the modules reading them, or why not.

    Full-weight gradients are used when present (q, k and v stacked, all reading the same input).
    Under LoRA only the adapters train: the gradient of B (out x r) is sum delta (A x)^T, whose
    row space is {A x} in R^r, so the span lives in R^r and candidates are mapped by A first.
    This holds whatever B's value (it starts at zero, making A's own gradient zero).
    """
    projs = arch.projections(stage)
    full = [(p, gradient[p.weight_key]) for p in projs if p.weight_key in gradient]
    if full:
        grads = [input_space_gradient(g, weight_is_in_out=p.weight_is_in_out) for p, g in full]
        sigma = None if noise is None else [noise.get(p.weight_key, 0.0) for p, _ in full]
        return Span.from_gradients(grads, rel_tol=rel_tol, name=full[0][0].prefix, noise=sigma)
    lora = [p for p in projs if p.lora_adapter and p.lora_key("B") in gradient]
    if lora:
        p: Projection = lora[0]
        a = arch.tensor(p.lora_key("A"))  # (r, in), nn.Linear orientation in peft
        return Span.from_gradients(
            [gradient[p.lora_key("B")]],
            rel_tol=rel_tol,
            transform=a,
            name=p.prefix,
            noise=None if noise is None else [noise.get(p.lora_key("B"), 0.0)],
        )
    names = ", ".join(p.weight_key for p in projs)
    return f"{stage}: the gradient has no entry for {names}"


_NOISE_CHUNK = 1 << 20  # entries per block of float32_noise


def float32_noise(
    weights: dict[str, Tensor], update: dict[str, Tensor], *, lr: float, steps: int
) -> dict[str, float]:
    """The rounding error, per entry, of a pseudo-gradient ``-update / lr`` computed from an update
    sent as ``local - global`` of weights kept in their own dtype (float32, bfloat16, ...): each
    local step rounds every weight to within half a unit in the last place (ulp), uniformly, so
    the error's std is sqrt(steps / 12) x ulp / lr; an update in a coarser dtype than the weights
    adds its own rounding. A float64 model has next to none."""
    out = {}
    for name, delta in update.items():
        w = weights.get(name)
        if w is None or not w.is_floating_point() or not delta.is_floating_point():
            continue
        coarser = delta.dtype != w.dtype and torch.finfo(delta.dtype).eps > torch.finfo(w.dtype).eps
        flat_w, flat_d = w.detach().reshape(-1), delta.detach().reshape(-1)
        total = 0.0
        for i in range(0, flat_w.numel(), _NOISE_CHUNK):  # chunks: an embedding is 10^7-10^8
            d = flat_d[i : i + _NOISE_CHUNK]
            local = flat_w[i : i + _NOISE_CHUNK] + d.to(w.dtype)
            ulp = (torch.nextafter(local, torch.full_like(local, math.inf)) - local).double()
            if coarser:
                ulp = ulp + (torch.nextafter(d, torch.full_like(d, math.inf)) - d).double().abs()
            total += float(ulp.pow(2).sum())
        rms = math.sqrt(total / max(flat_w.numel(), 1))
        out[name] = rms * math.sqrt(max(steps, 1) / 12) / lr
    return out


def recover(
    model: nn.Module,
    global_state: dict[str, Tensor],
    gradient: dict[str, Tensor],
    *,
    num_sequences: int,
    seq_len: int,
    kind: Literal["decoder", "encoder"],
    end_token: int | None = None,
    rel_tol: float = 1e-6,
    rank_margin: int | None = None,
    min_confidence: float = 0.5,
    chunk_size: int = 4096,
    max_prefixes: int | None = None,
    seed: int = 0,
    noise: dict[str, float] | None = None,
) -> Result:
    """Recover the token sequences of a batch from a client's update.

    Args:
        model: the architecture (a transformers GPT-2, LLaMA or BERT model, optionally wrapped by
            peft); its own weights are not read or changed.
        global_state: the weights the client started from (state-dict names).
        gradient: the update as a gradient, keyed by state-dict names; for several local steps
            pass -delta / lr. Read: the q/k/v weights of blocks 0 and 1 and block 0's first
            feed-forward weight (or their LoRA B matrices).
        num_sequences: sequences in the client's batch (protocol metadata).
        seq_len: tokens per sequence as fed to the model; for a decoder this includes the end
            token the toolkit appends (the last position of a causal LM gets no gradient).
        kind: "decoder" (causal LM loss) or "encoder" (bidirectional, e.g. classification).
        end_token: appended to decoder sequences (the token the toolkit appended), if given.
        rel_tol: singular values below rel_tol x the largest are treated as rounding. 1e-6, not
            1e-5: true directions of a BERT batch were measured down to 4e-6 above a float32
            floor of 4e-8.
        rank_margin: a span of rank >= dim - rank_margin is refused (default: min(20, dim/8),
            at least 4).
        min_confidence: report infeasible below this. Confidence is the minimum over the stages
            used of min(1 - 1/gap, explained): the separation between accepted and rejected
            candidates, capped by the share of the gradient the recovered text accounts for.
        chunk_size: candidates per block in distance computations (memory ~ chunk_size x d).
        max_prefixes: decoder search gives up beyond this many live prefixes
            (default 8 x num_sequences + 64).
        seed: for decoys and random restarts.
        noise: per gradient entry (by state-dict name), the std of its known error, such as the
            rounding of an update sent in float32 (``float32_noise``); spans drop directions
            below that floor instead of counting them.

    Returns:
        A ``Result``; ``sequences`` is empty whenever ``feasible`` is False.
    """
    if num_sequences < 1 or seq_len < 2:
        raise ValueError("num_sequences must be >= 1 and seq_len >= 2")
    start = time.perf_counter()
    with torch.no_grad():
        result = _recover(
            model,
            global_state,
            gradient,
            num_sequences=num_sequences,
            seq_len=seq_len,
            kind=kind,
            end_token=end_token,
            rel_tol=rel_tol,
            rank_margin=rank_margin,
            min_confidence=min_confidence,
            chunk_size=chunk_size,
            max_prefixes=max_prefixes or 8 * num_sequences + 64,
            seed=seed,
            noise=noise,
        )
    result.seconds = time.perf_counter() - start
    return result


def _recover(
    model,
    global_state,
    gradient,
    *,
    num_sequences,
    seq_len,
    kind,
    end_token,
    rel_tol,
    rank_margin,
    min_confidence,
    chunk_size,
    max_prefixes,
    seed,
    noise,
) -> Result:
    arch = architecture_for(model, global_state)
    if arch.kind != kind:
        raise ValueError(f"kind={kind!r} but {type(arch).__name__} is a {arch.kind}")
    n_positions = seq_len - 1 if kind == "decoder" else seq_len  # positions with a gradient
    n_tokens = num_sequences * n_positions

    def usable(stage: Stage) -> tuple[Span | None, LayerReport | None, str | None]:
        """The stage's span and report, and why it cannot be used (missing or saturated)."""
        span = stage_span(arch, stage, gradient, rel_tol=rel_tol, noise=noise)
        if isinstance(span, str):
            return None, None, span
        margin = default_rank_margin(span.dim) if rank_margin is None else rank_margin
        numerical = span.rank
        if numerical >= span.dim - margin and n_tokens < span.dim - margin:
            # Near-full rank from fewer tokens than that: drift of several local steps, or noise.
            # Keep as many leading directions as the margin allows (as DAGER does for FedAvg);
            # measured better than keeping n_tokens, which loses weak true directions to strong
            # drift. Calibration then decides whether candidates still separate.
            span = span.truncated(span.dim - margin - 1)
        rep = LayerReport(stage, span.name, span.rank, span.dim, margin, numerical_rank=numerical)
        if span.rank == 0:
            return span, rep, f"{stage} ({span.name}): the gradient is zero or not finite"
        if rep.saturated:
            return (
                span,
                rep,
                (
                    f"{stage} ({span.name}): gradient rank {span.rank} >= {span.dim} - {margin}; "
                    f"{num_sequences} x {n_positions} tokens are too many for this layer's width"
                ),
            )
        return span, rep, None

    # 1. Feasibility of every span used, before anything is emitted.
    if kind == "encoder":
        required: list[Stage] = ["layer1"] if num_sequences == 1 else ["layer1", "ffn"]
    else:
        required = ["layer1", "layer2"]
    spans: list[Span] = []
    reports: list[LayerReport] = []
    for stage in required:
        span, rep, why = usable(stage)
        if rep is not None:
            reports.append(rep)
        if why is not None:
            return Result(False, why, layers=reports)
        spans.append(span)
    prefilter = None
    if kind == "decoder":  # optional: skipped when missing (LoRA on attention only) or saturated
        span, rep, why = usable("ffn")
        prefilter = (span, rep) if why is None else None
    span_of = {r.stage: sp for r, sp in zip(reports, spans)}
    if prefilter is not None:
        span_of["ffn"] = prefilter[0]

    # 2. Layer 1: token sets. Tokens of the batch can also pass at positions where they do not
    # occur: when a token sits at two positions, the difference of the two position embeddings
    # enters the span, and an untrained LayerNorm (gain 1, bias 0) is linear up to scale. Later
    # stages remove them, so layer 1 may accept every distinct batch token at every position.
    positions = list(range(n_positions)) if arch.positional else [0]
    per_position_cap = min(spans[0].rank, n_tokens)
    dist, ids = scan_vocabulary(
        arch, spans[0], positions, keep=per_position_cap + 64, chunk_size=chunk_size
    )
    sets, cut = select_tokens(
        dist, ids, max_accept=per_position_cap * len(positions), report=reports[0]
    )
    if cut is None:
        return Result(False, "layer1: too few candidates to calibrate", layers=reports)

    # 3. Sequences (an encoder with one sequence needs layer 1 only).
    if len(spans) == 1:
        if any(s.numel() == 0 for s in sets):
            return _refuse("layer1: some position has no token", reports)
        seqs = [[int(s[0]) for s in sets]]
        worst = [float(dist[torch.arange(len(sets)), 0].max())]
        failure = None
    elif kind == "decoder":
        if prefilter is not None:
            reports.insert(1, prefilter[1])
        ext = extend_sequences(
            arch,
            spans[1],
            sets,
            num_sequences=num_sequences,
            n_positions=n_positions,
            report=reports[-1],
            max_prefixes=max_prefixes,
            prefilter=prefilter,
            seed=seed,
        )
        seqs, worst, failure = ext.sequences, ext.scores, ext.failure
    else:
        found = search_sequences(
            arch, spans[1], sets, num_sequences=num_sequences, report=reports[1], seed=seed
        )
        seqs, worst, failure = found.sequences, found.scores, found.failure
    if failure:
        return _refuse(failure, reports)
    if not seqs:
        return _refuse("no sequence passed the sequence stage", reports)

    # 4. Certificate: how much of each gradient the recovered text accounts for.
    if kind == "decoder":
        states = decoder_states(arch, seqs, n_positions)
    else:
        states = encoder_states(arch, seqs)
    for rep in reports:
        rep.explained = span_of[rep.stage].explained(states[rep.stage])

    confidence = min(r.confidence for r in reports)
    if confidence < min_confidence:
        worst_layer = min(reports, key=lambda r: r.confidence)
        return _refuse(
            f"{worst_layer.stage}: confidence {confidence:.2f} < {min_confidence} (gap between "
            f"accepted and rejected x{worst_layer.gap or 0:.3g}, share of the gradient explained "
            f"by the text {worst_layer.explained or 0:.2f})",
            reports,
        )
    if end_token is not None and kind == "decoder":
        seqs = [s + [int(end_token)] for s in seqs]
    summary = ", ".join(
        f"{r.stage} rank {r.rank}/{r.dim} gap x{r.gap:.3g} explained {r.explained:.3f}"
        for r in reports
    )
    return Result(True, summary, confidence, seqs, layers=reports, scores=worst)


def _refuse(reason: str, reports: list[LayerReport]) -> Result:
    confidence = min((r.confidence for r in reports), default=0.0)
    return Result(False, reason, confidence, layers=reports)
