"""Recovering the client's labels from the classifier layer of its update.

Rules (``g`` is the per-step average of the pseudo-gradient of the last linear layer):
- one image (iDLG, Zhao et al. 2020): with non-negative features the true class's weight-gradient
  row is the only one with a negative sum: ``argmin_c sum_j g_W[c, j]``;
- a batch: the label set is the classes whose rows have a negative minimum;
- label counts where the batch repeats a class: with a bias, ``g_b[c] = mean_n p_nc - n_c / N``.
  iLRG (Ma et al., CVPR 2023) reads each class's embedding off its own gradient rows
  (``g_W[c] / g_b[c]``), feeds it through the classifier for that class's softmax and solves the
  linear system for the counts; it is right where each class's gradient rows are dominated by that
  class's own samples (many classes, few samples per class) and declines, by an integrality and
  residual check, where they are not (few classes with many samples each: at 10 classes and batch
  1,024 it declined every measured batch), and by the label-set rule when a class it counts 0 has
  a negative row (an image a trained model classifies confidently barely moves the gradient and
  can vanish from the counts). The checks are plausibility tests, not a proof. Where iLRG declines,
  ``n_c = N (p_c - g_b[c])`` with ``p_c`` the model's mean softmax on probe images estimates them.
When no rule applies (no classifier bias for counts, an empty or oversized set), the attack falls
back to optimising soft labels jointly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.func import functional_call

from gradleak.attacks.base import ServerView


def idlg_label(grad_weight: torch.Tensor) -> int:
    """The iDLG label of a single image from the last layer's weight gradient (classes x
    features)."""
    return int(grad_weight.sum(dim=1).argmin())


def label_set(grad_weight: torch.Tensor) -> list[int]:
    """Classes present in the batch: rows of the weight gradient with a negative minimum."""
    return [int(c) for c in torch.nonzero(grad_weight.min(dim=1).values < 0).flatten()]


def label_counts(grad_bias: torch.Tensor, mean_probs: torch.Tensor, n: int) -> list[int]:
    """How many images of each class: ``N (p_c - g_b[c])`` clamped at 0, scaled to sum to N and
    rounded by largest remainders (always exactly N labels, however noisy the update)."""
    est = torch.nan_to_num(n * (mean_probs - grad_bias).double(), nan=0.0, posinf=0.0).clamp_min(0)
    if float(est.sum()) <= 0:
        est = torch.ones_like(est)
    est = est * n / est.sum()
    counts = est.floor().long()
    short = n - int(counts.sum())
    counts[torch.argsort(est - counts, descending=True, stable=True)[:short]] += 1
    return [c for c, k in enumerate(counts.tolist()) for _ in range(k)]


def counts_from_class_probs(
    grad_bias: torch.Tensor, n: int, class_probs: torch.Tensor
) -> list[int]:
    """How many images of each class, from per-class expected probabilities ``P[c] = E[p | y = c]``
    (e.g. the global model's mean softmax on public images of class c): iLRG's system
    ``N g_b = sum_c n_c (P[c] - e_c)`` with ``sum(n) = N``, with public means in place of the
    batch's, by least squares, rounded by largest remainders. Exact while the batch's own
    probabilities stay within half a count of what P predicts per class: at batch 1,024 of 10
    classes that held for at most 1 batch in 20 (benchmarks/exact.py labels)."""
    k = len(grad_bias)
    a = torch.cat(
        [
            (class_probs.double() - torch.eye(k, dtype=torch.float64)).T,
            torch.ones(1, k, dtype=torch.float64),
        ]
    )
    rhs = torch.cat([n * grad_bias.double(), torch.tensor([float(n)], dtype=torch.float64)])
    est = torch.linalg.lstsq(a, rhs[:, None]).solution[:, 0].clamp_min(0)
    counts = est.floor().long()
    short = n - int(counts.sum())
    if short > 0:
        counts[torch.argsort(est - counts, descending=True, stable=True)[:short]] += 1
    while int(counts.sum()) > n:  # rounding past N: take from the smallest remainders
        counts[int(torch.argmin(torch.where(counts > 0, est - counts, torch.inf)))] -= 1
    return [c for c, m in enumerate(counts.tolist()) for _ in range(m)]


@dataclass(frozen=True)
class IlrgResult:
    """iLRG's answer: the counts per class (None where it declined), the real-valued solution of
    its system, and why it accepted or declined."""

    counts: list[int] | None
    estimate: torch.Tensor
    reason: str


def ilrg_counts(
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    n: int,
    *,
    tolerance: float = 0.1,
) -> IlrgResult:
    """Per-class counts of a batch of ``n`` from one gradient of the classifier layer (iLRG).

    ``grad_weight`` / ``grad_bias`` are the batch-mean gradient of the last linear layer (classes x
    features, classes), ``weight`` / ``bias`` its parameters at that step. Class c's embedding is
    ``h_c = g_W[c] / g_b[c]``, its probabilities ``P[c] = softmax(W h_c + b)``; the counts solve
    ``sum_c n_c (P[c] - e_c) = N g_b`` with ``sum(n) = N`` (pseudoinverse, float64). The answer is
    accepted only if every count is within ``tolerance`` of a non-negative integer, they sum to N
    and the integer counts satisfy the system to ``tolerance`` (in counts), and no class counted 0
    has a negative entry in its weight-gradient row (with non-negative embeddings only present
    classes do: the label-set rule); otherwise the batch breaks the method's assumption and it
    declines rather than round a wrong answer. Passing the checks is evidence, not proof."""
    k = len(grad_bias)
    gw, gb = grad_weight.double(), grad_bias.double()
    if gw.shape != (k, weight.shape[1]) or weight.shape[0] != k:
        raise ValueError(
            f"classifier gradient {tuple(gw.shape)} does not fit {tuple(weight.shape)}"
        )
    if not bool(torch.isfinite(gw).all() and torch.isfinite(gb).all()):
        return IlrgResult(None, torch.full((k,), float("nan")), "non-finite gradient")
    if bool((gb == 0).any()):
        return IlrgResult(None, torch.full((k,), float("nan")), "a class's bias gradient is 0")
    emb = gw / gb[:, None]
    probs = torch.softmax(emb @ weight.double().T + bias.double(), dim=-1)
    eye = torch.eye(k, dtype=torch.float64)
    a = torch.cat([(probs - eye).T, torch.ones(1, k, dtype=torch.float64)])
    rhs = torch.cat([n * gb, torch.tensor([float(n)], dtype=torch.float64)])
    est = torch.linalg.pinv(a) @ rhs
    if not bool(torch.isfinite(est).all()):
        return IlrgResult(None, est, "the system has no finite solution")
    counts = est.round()
    off = float((est - counts).abs().max())
    residual = float((a @ counts - rhs).abs().max())
    if off > tolerance or bool((counts < 0).any()) or int(counts.sum()) != n:
        return IlrgResult(
            None,
            est,
            f"counts not integral (off by up to {off:.2f}): the classes' gradient rows "
            "mix too many samples of other classes",
        )
    if residual > tolerance:
        return IlrgResult(None, est, f"integer counts leave a residual of {residual:.2f}")
    # A class with no image has the row sum_n p_nc h_n: non-negative for ReLU embeddings. A row
    # with a clearly negative entry therefore holds an image; iLRG counting 0 there is wrong (or
    # the embeddings can be negative): decline either way.
    rel = gw.min(dim=1).values / gw.abs().max(dim=1).values.clamp_min(torch.finfo(gw.dtype).tiny)
    missed = [c for c in range(k) if counts[c] == 0 and float(rel[c]) < -1e-3]
    if missed:
        return IlrgResult(
            None, est, f"classes {missed} have negative gradient rows (an image) but count 0"
        )
    return IlrgResult(
        [int(c) for c in counts.tolist()], est, f"integral to {off:.3f}, residual {residual:.3f}"
    )


def recover_labels(view: ServerView, probe: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(labels, strategy) from the update; labels None means 'optimise them jointly'.

    Counts come from iLRG where the update is one gradient step and iLRG accepts its answer,
    otherwise from the mean-softmax estimate. ``probe`` holds normalised images fed to the global
    model to estimate that mean softmax.
    """
    if view.known_labels is not None:
        return view.known_labels.clone(), "known"
    w_name, b_name = view.classifier()
    pg = view.pseudo_gradient()
    g_w = pg[w_name] / view.meta.steps
    n = view.num_examples
    if n == 1:
        return torch.tensor([idlg_label(g_w)], dtype=torch.long), "idlg"
    if b_name is not None:
        if view.meta.steps == 1:
            found = ilrg_counts(
                g_w, pg[b_name], view.global_state[w_name], view.global_state[b_name], n
            )
            if found.counts is not None:
                labels = [c for c, m in enumerate(found.counts) for _ in range(m)]
                return torch.tensor(labels, dtype=torch.long), "ilrg"
        params = {k: v.float() for k, v in view.global_state.items()}
        with torch.no_grad():
            probs = F.softmax(
                functional_call(view.model.eval(), params, (probe.cpu(),)), dim=-1
            ).mean(0)
        view.model.train()
        counts = label_counts(pg[b_name] / view.meta.steps, probs, n)
        return torch.tensor(counts, dtype=torch.long), "label-counts"
    present = label_set(g_w)
    if 0 < len(present) <= n:
        labels = [present[i % len(present)] for i in range(n)]
        return torch.tensor(sorted(labels), dtype=torch.long), "label-set"
    return None, "optimize"
