"""Analytic recovery of a fully connected layer's input from its weight and bias gradients.

For ``y = W x + b`` and one sample, ``dL/dW = delta x^T`` and ``dL/db = delta``, so every row i with
``delta_i != 0`` gives ``x = dW[i] / db[i]``; the least-squares combination over all rows is exact.
For a batch, row c of the classifier mixes all samples, so class c's input is recovered (exactly
only when the other samples put no probability on c) for the classes that occur once. Where the
layer is a softmax classifier, the labels are known and the update is one gradient of the batch's
mean cross-entropy, ``batch_linear_inputs`` recovers every sample's input exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from gradleak.attacks.base import ServerView


def linear_input(grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> torch.Tensor:
    """The input of a linear layer for a single sample: ``sum_i b_i W_i / sum_i b_i^2``."""
    gw, gb = grad_weight.double(), grad_bias.double()
    denom = gb.pow(2).sum()
    if float(denom) == 0.0:
        raise ValueError("the bias gradient is zero: the layer's input cannot be recovered")
    return (gb @ gw / denom).to(grad_weight.dtype)


def checked_linear_input(
    grad_weight: torch.Tensor, grad_bias: torch.Tensor, *, tolerance: float = 1e-2
) -> torch.Tensor | None:
    """``linear_input`` where the gradient is one sample's, else None: the answer must explain the
    weight gradient, ``g_W = g_b h^T`` to ``tolerance`` (relative). A defence that changed the
    update (pruning, noise, coarse quantisation) breaks that product, and its "input" would be
    wrong, not exact."""
    gw, gb = grad_weight.detach().double(), grad_bias.detach().double()
    if float(gb.pow(2).sum()) == 0.0 or not bool(torch.isfinite(gw).all()):
        return None
    h = linear_input(gw, gb)
    if float((torch.outer(gb, h) - gw).norm() / gw.norm().clamp_min(1e-300)) > tolerance:
        return None
    return h.to(grad_weight.dtype)


def batch_linear_inputs(
    grad_weight: torch.Tensor,
    grad_bias: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    labels: torch.Tensor,
    *,
    max_condition: float = 1e3,
    tolerance: float = 1e-4,
    iterations: int = 200,
) -> torch.Tensor | None:
    """Each sample's input H (N x features) of a softmax classifier ``z = W h + b``, from one
    gradient of the batch's mean cross-entropy with the labels known; None where the gradient does
    not pin it down.

    With ``A = (P - Y)^T / N`` (classes x N; P the samples' softmax, Y their one-hot labels),
    ``g_W = A H`` and ``g_b = A 1``. For a given P, H is the least-squares solution of the first,
    unique when A's N columns are independent (at most as many samples as classes; repeated labels
    leave only the small differences of P to tell their columns apart). P in turn is the softmax
    of ``H W^T + b``: the pair is found as a fixed point from ``P = softmax(b)``, in float64. The
    answer is given only if A is well conditioned (condition number at most ``max_condition``) and
    it reproduces both gradients to ``tolerance`` (relative): the bias gradient is a check the
    solve does not use.
    """
    n, k = len(labels), weight.shape[0]
    if n > k or grad_weight.shape != weight.shape or grad_bias.shape != (k,):
        return None
    gw, gb, w, b = (t.detach().double().cpu() for t in (grad_weight, grad_bias, weight, bias))
    if not bool(torch.isfinite(gw).all() and torch.isfinite(gb).all()):
        return None
    y = F.one_hot(labels.cpu(), k).double()
    p = F.softmax(b, -1).expand(n, k)
    for _ in range(iterations):
        h = torch.linalg.lstsq((p - y).T / n, gw).solution
        p, before = F.softmax(h @ w.T + b, -1), p
        if float((p - before).abs().max()) < 1e-14:
            break
    a = (p - y).T / n
    h = torch.linalg.lstsq(a, gw).solution
    sv = torch.linalg.svdvals(a)
    if float(sv[-1]) <= 0 or float(sv[0] / sv[-1]) > max_condition:
        return None
    scale_w, scale_b = gw.norm().clamp_min(1e-300), gb.norm().clamp_min(1e-300)
    if float((a @ h - gw).norm() / scale_w) > tolerance:
        return None
    if float((a.sum(1) - gb).norm() / scale_b) > tolerance:
        return None
    return h.to(grad_weight.dtype)


def classifier_inputs(
    grad_weight: torch.Tensor, grad_bias: torch.Tensor, labels: torch.Tensor
) -> dict[int, torch.Tensor]:
    """For each class occurring once in ``labels``: the classifier input ``dW[c] / db[c]``."""
    counts = torch.bincount(labels, minlength=grad_weight.shape[0])
    return {
        int(c): grad_weight[c] / grad_bias[c]
        for c in torch.nonzero(counts == 1).flatten()
        if float(grad_bias[c]) != 0.0
    }


def first_layer_images(view: ServerView) -> torch.Tensor:
    """A one-image update of a model whose first layer is linear on the flattened image: the image
    in [0, 1] (exact up to float precision)."""
    first = next((n for n, p in view.model.named_parameters() if p.ndim == 2), None)
    if first is None or not first.endswith("weight"):
        raise ValueError("the model has no fully connected layer to invert")
    bias = first[: -len("weight")] + "bias"
    pg = view.pseudo_gradient()
    if bias not in pg:
        raise ValueError(f"{first} has no bias: the analytic recovery needs one")
    x = linear_input(pg[first], pg[bias])
    c, h, w = view.spec.shape
    if x.numel() != c * h * w:
        raise ValueError(
            f"{first} takes {x.numel()} inputs, not the {c * h * w} pixels of an image"
        )
    mean = torch.tensor(view.spec.mean).view(c, 1, 1)
    std = torch.tensor(view.spec.std).view(c, 1, 1)
    return (x.view(1, c, h, w) * std + mean).clamp(0, 1)
