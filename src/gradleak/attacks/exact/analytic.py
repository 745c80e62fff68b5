"""Analytic recovery of a fully connected layer's input from its weight and bias gradients.

For ``y = W x + b`` and one sample, ``dL/dW = delta x^T`` and ``dL/db = delta``, so every row i with
``delta_i != 0`` gives ``x = dW[i] / db[i]``; the least-squares combination over all rows is exact.
For a batch, row c of the classifier mixes all samples, so class c's input is recovered (exactly
only when the other samples put no probability on c) for the classes that occur once.
"""

from __future__ import annotations

import torch

from gradleak.attacks.base import ServerView


def linear_input(grad_weight: torch.Tensor, grad_bias: torch.Tensor) -> torch.Tensor:
    """The input of a linear layer for a single sample: ``sum_i b_i W_i / sum_i b_i^2``."""
    gw, gb = grad_weight.double(), grad_bias.double()
    denom = gb.pow(2).sum()
    if float(denom) == 0.0:
        raise ValueError("the bias gradient is zero: the layer's input cannot be recovered")
    return (gb @ gw / denom).to(grad_weight.dtype)


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
