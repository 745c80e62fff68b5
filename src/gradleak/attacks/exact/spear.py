"""SPEAR (Dimitrov et al., NeurIPS 2024): exact recovery of a batch from a linear+ReLU layer.

The layer ``z = W1 x + b1`` is followed by a ReLU; the server knows W1, b1, the gradients
dW1, db1 and the batch size B, and optionally the next linear layer (the classifier head,
W2, b2, and its gradients), which enables the deterministic lifted solver and the full
self-certification.  For a hidden layer after a convolutional stem the recovered "inputs"
are that layer's inputs (the stem's features).

Pipeline, all in float64:
1. drop neurons with an all-zero gradient row (dead for the whole batch);
2. rank-B factorisation ``dW1 = L diag(s) Vt`` by a randomised range finder;
3. find Q with ``D = L Q`` (pre-activation gradients): lifted solver when the head is known
   and small enough, else SPEAR's sampling with W1/b1-based speed-ups and a feasibility LP;
4. fix each column's scale from db1 (``db1 = D 1``), rebuild ``X^T = Q^{-1} diag(s) Vt``;
5. polish every q_i on the neurons that the rebuilt x_i switches off;
6. certify: infer labels, recompute the gradients and compare (exact: ~1e-7 relative).

Recovery is all or nothing (X needs every column of Q), so ``inputs`` is None unless every
direction was found and every available check passed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from gradleak.attacks.exact.linalg import (
    Tensorish,
    as_f64,
    null_vector,
    range_finder_svd,
    unit_rows,
)
from gradleak.attacks.exact.spear_lifted import lifted_unknowns, solve_lifted
from gradleak.attacks.exact.spear_sampling import search

Method = Literal["auto", "lifted", "sampling"]

#: Relative gradient mismatch below which a rebuilt batch counts as exact.  Exact answers
#: give ~1e-7 (float32 client gradients), wrong ones ~1.
CERTIFY_TOL = 1e-4


@dataclass(frozen=True)
class SpearResult:
    """Outcome of :func:`spear`.

    ``inputs`` (B x d, float64) is returned only for a complete, consistent solution;
    ``certified`` means the four gradients were recomputed from (inputs, labels) and matched.
    Rows are in arbitrary order (matching to originals is the evaluator's job).
    """

    certified: bool
    inputs: torch.Tensor | None
    labels: torch.Tensor | None
    directions_found: int
    batch_size: int
    reason: str
    seconds: float
    method: str
    gradient_mismatch: float | None = None
    samples_drawn: int = 0
    diagnostics: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class _Layer:
    """Float64 view of the attacked layer restricted to what the solvers need."""

    w1: np.ndarray
    b1: np.ndarray
    gw1: np.ndarray
    gb1: np.ndarray
    alive: np.ndarray  # neurons with a non-zero gradient row
    basis: np.ndarray  # L: live neurons x B, orthonormal
    coef: np.ndarray  # diag(s) Vt: B x d, so that dW1[alive] = L @ coef


@dataclass(frozen=True)
class _Head:
    """Float64 view of the classifier after the ReLU; any field may be missing."""

    w: np.ndarray | None
    b: np.ndarray | None
    gw: np.ndarray | None
    gb: np.ndarray | None


def spear(
    weight: Tensorish,
    bias: Tensorish,
    grad_weight: Tensorish,
    grad_bias: Tensorish,
    batch_size: int,
    *,
    head_weight: Tensorish | None = None,
    head_bias: Tensorish | None = None,
    head_grad_weight: Tensorish | None = None,
    head_grad_bias: Tensorish | None = None,
    method: Method = "auto",
    time_limit: float = 60.0,
    max_samples: int = 10**9,
    seed: int = 0,
) -> SpearResult:
    """Recover the B inputs of a linear+ReLU layer from one FedSGD gradient.

    ``head_*`` describe the linear layer right after the ReLU, which must be the classifier
    of a mean softmax cross-entropy loss.  ``head_weight`` enables the lifted solver and label
    inference; with ``head_bias`` too the batch is certified against dW1, db1 and, when
    given, dW2, db2.  ``method``: "lifted" (needs the head), "sampling" (SPEAR's search) or
    "auto" (lifted, then sampling in the remaining time).  ``time_limit`` (seconds) and
    ``max_samples`` bound the whole call; the sampling search stops at either.
    """
    start = time.monotonic()
    b = int(batch_size)
    w1, b1, gw1, gb1 = (as_f64(v) for v in (weight, bias, grad_weight, grad_bias))
    head = _Head(*(as_f64(v) for v in (head_weight, head_bias, head_grad_weight, head_grad_bias)))

    def fail(
        reason: str,
        found: int = 0,
        used: str = "none",
        samples: int = 0,
        diag: dict[str, float] | None = None,
    ) -> SpearResult:
        return SpearResult(
            False,
            None,
            None,
            found,
            b,
            reason,
            time.monotonic() - start,
            used,
            samples_drawn=samples,
            diagnostics=diag or {},
        )

    alive = np.abs(gw1).max(axis=1) > 0
    if b < 1 or b > min(alive.sum(), gw1.shape[1]):
        return fail(f"batch size {b} exceeds the rank the layer can carry")
    low = range_finder_svd(gw1[alive], b, seed=seed)
    diag: dict[str, float] = {"tail_ratio": low.tail_ratio}
    if low.tail_ratio > 1e-3:
        return fail(
            f"gradient is not of rank {b} (singular value ratio {low.tail_ratio:.1e}):"
            " duplicate inputs, wrong batch size or noisy gradients",
            diag=diag,
        )
    layer = _Layer(w1, b1, gw1, gb1, alive, low.u, low.s[:, None] * low.vt)
    notes: list[str] = []

    if method in ("auto", "lifted"):
        if head.w is None:
            notes.append("lifted: needs head_weight")
        elif lifted_unknowns(b, head.w.shape[0], True) >= alive.sum():
            notes.append("lifted: fewer live neurons than unknowns")
        else:
            out = solve_lifted(layer.basis, head.w[:, alive], softmax_head=True, seed=seed)
            diag["lifted_gap"] = out.gap
            if out.q is not None:
                attempt = _finish(layer, head, out.q, start, "lifted", 0, diag)
                if attempt.inputs is not None or method == "lifted":
                    return attempt
                notes.append(f"lifted: {attempt.reason}")
            else:
                notes.append(f"lifted: {out.reason}")
        if method == "lifted":
            return fail("; ".join(notes), used="lifted", diag=diag)

    # Sampling search; pre-activations are affine in the dual coordinates p (rows of Q^-1):
    # x = Vt^T (s * p), so W1 x + b1 = ((W1 Vt^T) * s) p + b1.
    pre_w = (w1 @ low.vt.T) * low.s
    out_s = search(unit_rows(layer.basis), pre_w, b1, alive, start + time_limit, max_samples, seed)
    diag.update(known_directions=out_s.known_directions, lp_rejected=out_s.rejected_by_lp)
    if len(out_s.found) < b:
        notes.append(
            f"sampling: {len(out_s.found)} of {b} directions after {out_s.samples} samples"
        )
        return fail("; ".join(notes), len(out_s.found), "sampling", out_s.samples, diag)
    return _finish(layer, head, out_s.found.T, start, "sampling", out_s.samples, diag)


def _rebuild(layer: _Layer, q: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Scale the columns of Q from db1 (= D 1) and rebuild X; None if Q is singular."""
    d_unit = layer.basis @ q
    scale, *_ = np.linalg.lstsq(d_unit, layer.gb1[layer.alive], rcond=None)
    if np.any(np.abs(scale) < 1e-300):
        return None
    q_s = q * scale
    try:
        x = np.linalg.solve(q_s, layer.coef)
    except np.linalg.LinAlgError:
        return None
    return q_s, x


def _polish(layer: _Layer, q: np.ndarray, rounds: int = 2) -> np.ndarray:
    """Re-fit each q_i as the null vector of the neurons the rebuilt x_i switches off."""
    unit = unit_rows(layer.basis)
    w_alive, b_alive = layer.w1[layer.alive], layer.b1[layer.alive]
    q = q.copy()
    for _ in range(rounds):
        built = _rebuild(layer, q)
        if built is None:
            return q
        pre = built[1] @ w_alive.T + b_alive
        for i in range(q.shape[1]):
            band = 1e-6 * np.abs(pre[i]).max()
            off = pre[i] < -band
            if off.sum() < q.shape[0]:
                continue
            qi, _ = null_vector(unit[off])
            resid = np.abs(unit[off] @ qi)
            keep = resid <= 20 * np.median(resid) + 1e-12
            if keep.sum() >= q.shape[0]:
                qi, _ = null_vector(unit[off][keep])
            q[:, i] = qi * np.sign(qi @ q[:, i])
    return q


def _finish(
    layer: _Layer,
    head: _Head,
    q: np.ndarray,
    start: float,
    method: str,
    samples: int,
    diag: dict[str, float],
) -> SpearResult:
    """Polish Q, rebuild X, infer labels and certify (or report why not)."""
    b = q.shape[1]
    q = _polish(layer, q)
    built = _rebuild(layer, q)
    if built is None:
        return SpearResult(
            False,
            None,
            None,
            b,
            b,
            "Q is singular",
            time.monotonic() - start,
            method,
            samples_drawn=samples,
            diagnostics=diag,
        )
    q_s, x = built
    d = layer.basis @ q_s  # live neurons x B
    pre = x @ layer.w1.T + layer.b1  # B x neurons
    on = pre[:, layer.alive].T > 0
    pattern = float(np.linalg.norm(d[~on]) / np.linalg.norm(d))
    dead_on = (
        float((pre[:, ~layer.alive] > 1e-9 * np.abs(pre).max()).mean())
        if (~layer.alive).any()
        else 0.0
    )
    diag = {**diag, "pattern_residual": pattern, "dead_neurons_switched_on": dead_on}
    consistent = pattern < CERTIFY_TOL and dead_on == 0.0
    if head.w is None or head.b is None:
        if not consistent:
            return SpearResult(
                False,
                None,
                None,
                b,
                b,
                f"inconsistent ReLU pattern (residual {pattern:.1e})",
                time.monotonic() - start,
                method,
                samples_drawn=samples,
                diagnostics=diag,
            )
        return SpearResult(
            False,
            torch.from_numpy(x),
            None,
            b,
            b,
            "complete and ReLU-consistent; no head given, so not certified",
            time.monotonic() - start,
            method,
            None,
            samples,
            diag,
        )
    labels = _infer_labels(x, d, on, layer, head.w, head.b)
    given = {"dW1": layer.gw1, "db1": layer.gb1, "dW2": head.gw, "db2": head.gb}
    rebuilt = head_gradients(x, labels, layer.w1, layer.b1, head.w, head.b)
    mismatch = max(
        float(np.linalg.norm(rebuilt[k] - g) / np.linalg.norm(g))
        for k, g in given.items()
        if g is not None
    )
    ok = mismatch < CERTIFY_TOL
    reason = (
        "certified: recomputed gradients match"
        if ok
        else f"rebuilt batch does not reproduce the gradients (mismatch {mismatch:.1e})"
    )
    return SpearResult(
        ok,
        torch.from_numpy(x) if ok else None,
        torch.from_numpy(labels) if ok else None,
        b,
        b,
        reason,
        time.monotonic() - start,
        method,
        mismatch,
        samples,
        diag,
    )


def _infer_labels(
    x: np.ndarray,
    d: np.ndarray,
    on: np.ndarray,
    layer: _Layer,
    head_w: np.ndarray,
    head_b: np.ndarray,
) -> np.ndarray:
    """Labels from D: on active neurons D[:, i] = W2^T g_i with g_i = (softmax_i - onehot_i)/B."""
    b = x.shape[0]
    w_alive = head_w[:, layer.alive]
    h = np.maximum(x @ layer.w1.T + layer.b1, 0.0)
    probs = _softmax(h @ head_w.T + head_b)
    labels = np.empty(b, dtype=np.int64)
    for i in range(b):
        g, *_ = np.linalg.lstsq(w_alive[:, on[:, i]].T, d[on[:, i], i], rcond=None)
        labels[i] = int(np.argmax(probs[i] - b * g))
    return labels


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def head_gradients(
    x: np.ndarray,
    labels: np.ndarray,
    w1: np.ndarray,
    b1: np.ndarray,
    w2: np.ndarray,
    b2: np.ndarray,
) -> dict[str, np.ndarray]:
    """Float64 gradients of the mean cross-entropy of ``W2 relu(W1 x + b1) + b2``."""
    b = x.shape[0]
    pre = x @ w1.T + b1
    h = np.maximum(pre, 0.0)
    g = _softmax(h @ w2.T + b2)
    g[np.arange(b), labels] -= 1.0
    g /= b
    d = (g @ w2) * (pre > 0)
    return {"dW1": d.T @ x, "db1": d.sum(0), "dW2": g.T @ h, "db2": g.sum(0)}
