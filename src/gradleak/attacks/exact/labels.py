"""Recovering the client's labels from the classifier layer of its update.

Rules (``g`` is the per-step average of the pseudo-gradient of the last linear layer):
- one image (iDLG, Zhao et al. 2020): with non-negative features the true class's weight-gradient
  row is the only one with a negative sum: ``argmin_c sum_j g_W[c, j]``;
- a batch: the label set is the classes whose rows have a negative minimum;
- label counts where the batch repeats a class: with a bias, ``g_b[c] = mean_n p_nc - n_c / N``,
  so the counts are exact exactly when the batch's summed softmax ``sum_n p_n`` is known. No
  linear read-out of the update gives it: every gradient entry is a per-image sum of
  ``sum_c J_c(x) (p_c(x) - [y = c])``, whose mean is 0 when y is drawn from the model's own
  softmax, while a count's summand ``[y = c]`` has mean ``p_c(x)``. Exact counts therefore need
  the images' own predictions, one by one.
- per-image labels (``instance_labels``): where the classifier reads a ReLU layer, one gradient
  step, the lifted solver of SPEAR recovers every image's pre-activation gradient and input to
  that layer, and SPEAR's certificate recomputes the last two layers' gradients in float64 from
  the rebuilt batch and its labels (a proof, not a plausibility test). It needs the batch within
  the layer's rank and more live neurons than ``N (N + 1) / 2 + N (classes - 1)`` unknowns (about
  N^2 / 2: batch 55 for a 2,048-wide layer; batch 1,024 would need about 534,000), and declines
  otherwise;
- iLRG (Ma et al., ICLR 2023, "Instance-wise Batch Label Restoration via Gradients in Federated
  Learning") reads each class's embedding off its own gradient rows (``g_W[c] / g_b[c]``), feeds
  it through the classifier for that class's softmax and solves the linear system for the counts;
  that embedding is an approximation (the paper's and its code's), right where each class's
  gradient rows are dominated by that class's own samples (many classes, few samples per class).
  It declines, by an integrality and residual check, where they are not (few classes with many
  samples each: at 10 classes and batch 1,024 it declined every measured batch), and by the
  label-set rule when a class it counts 0 has a negative row (an image a trained model classifies
  confidently barely moves the gradient and can vanish from the counts). The checks are
  plausibility tests, not a proof. Where both decline, ``n_c = N (p_c - g_b[c])`` with ``p_c`` the
  model's mean softmax on probe images estimates the counts (strategy "label-counts": an
  estimate).
When no rule applies (no classifier bias for counts, an empty or oversized set), the attack falls
back to optimising soft labels jointly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradleak.attacks.base import ServerView
from gradleak.attacks.exact.spear import spear
from gradleak.attacks.exact.spear_lifted import lifted_unknowns

#: Largest lifted system ``instance_labels`` solves (unknowns; its Gram matrix is this squared and
#: its eigen-decomposition costs this cubed: a few seconds at 2,000 on two cores).
MAX_LIFTED_UNKNOWNS = 4096


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


@dataclass(frozen=True)
class InstanceResult:
    """``instance_labels``' answer: one label per image (sorted; None where it declined), why,
    and the seconds it took."""

    labels: list[int] | None
    reason: str
    seconds: float


def instance_labels(
    weight: torch.Tensor,
    bias: torch.Tensor,
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    head_weight: torch.Tensor,
    head_bias: torch.Tensor,
    head_grad_weight: torch.Tensor,
    head_grad_bias: torch.Tensor,
    n: int,
    *,
    max_unknowns: int = MAX_LIFTED_UNKNOWNS,
) -> InstanceResult:
    """Every image's label from one gradient of ``head(relu(layer(x)))`` (mean cross-entropy of a
    batch of ``n``), certified.

    ``weight``/``bias`` and their gradients belong to the linear layer the ReLU follows, ``head_*``
    to the classifier after it (the batch-mean gradient of one step). SPEAR's lifted solver finds
    the n pre-activation gradients, the layer's inputs are rebuilt, each label inferred, and the
    four gradients recomputed in float64: the labels are returned only when they reproduce the
    given gradients (relative mismatch below 1e-4; exact answers give about 1e-7, wrong ones
    about 1). Declines at once where the geometry cannot carry the batch: n above the layer's
    rank (its live neurons or its inputs), or the lifted system's ``n (n + 1) / 2 + n (classes -
    1)`` unknowns not below the live neurons (or above ``max_unknowns``)."""
    start = time.monotonic()

    def done(labels: list[int] | None, reason: str) -> InstanceResult:
        return InstanceResult(labels, reason, time.monotonic() - start)

    live = int((grad_weight.abs().amax(dim=1) > 0).sum())
    rank = min(live, weight.shape[1])
    if n > rank:
        return done(
            None,
            f"a batch of {n} exceeds the rank of the layer before the classifier ({live} live "
            f"neurons, {weight.shape[1]} inputs)",
        )
    need = lifted_unknowns(n, head_weight.shape[0], True)
    if need >= live:
        return done(
            None,
            f"a batch of {n} needs more than {need} live neurons before the classifier "
            f"(n (n + 1) / 2 + n (classes - 1)); the layer has {live}",
        )
    if need > max_unknowns:
        return done(None, f"the lifted system ({need} unknowns) exceeds {max_unknowns}")
    r = spear(
        weight,
        bias,
        grad_weight,
        grad_bias,
        n,
        head_weight=head_weight,
        head_bias=head_bias,
        head_grad_weight=head_grad_weight,
        head_grad_bias=head_grad_bias,
        method="lifted",
    )
    if not r.certified or r.labels is None:
        return done(None, r.reason)
    return done(sorted(int(c) for c in r.labels.tolist()), r.reason)


def _hidden_before_head(view: ServerView, head: str) -> str | None:
    """The linear layer (with a bias) whose ReLU the classifier reads, by module order (dropout
    and identities skipped); None where the model does not end that way. A model whose forward
    differs from its module order fails the certificate, not the labels."""
    leaves = [
        (name, m)
        for name, m in view.model.named_modules()
        if not list(m.children()) and not isinstance(m, (nn.Dropout, nn.Identity))
    ]
    names = [name for name, _ in leaves]
    if head not in names:
        return None
    i = names.index(head)
    if i < 2 or not isinstance(leaves[i - 1][1], nn.ReLU):
        return None
    name, layer = leaves[i - 2]
    if not isinstance(layer, nn.Linear) or layer.bias is None:
        return None
    return name


def recover_labels(view: ServerView, probe: torch.Tensor) -> tuple[torch.Tensor | None, str]:
    """(labels, strategy) from the update; labels None means 'optimise them jointly'.

    Where the update is one gradient step: certified per-image labels ("instances") where the
    classifier reads a ReLU layer wide enough for the batch, else iLRG's counts ("ilrg") where
    iLRG accepts its answer; otherwise the mean-softmax estimate ("label-counts"). ``probe`` holds
    normalised images fed to the global model to estimate that mean softmax.
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
            hidden = _hidden_before_head(view, w_name.rpartition(".")[0])
            if hidden is not None:
                prefix = f"{hidden}."
                state = view.global_state
                each = instance_labels(
                    state[prefix + "weight"],
                    state[prefix + "bias"],
                    pg[prefix + "weight"],
                    pg[prefix + "bias"],
                    state[w_name],
                    state[b_name],
                    pg[w_name],
                    pg[b_name],
                    n,
                )
                if each.labels is not None:
                    return torch.tensor(each.labels, dtype=torch.long), "instances"
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
