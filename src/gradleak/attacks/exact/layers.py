"""Where the exact attacks act: the fully connected layer that reads the pixels, and what follows
it.

SPEAR and the Cocktail Party Attack recover the inputs of a linear layer from its weight gradient
(``dW = D X^T``). On an image classifier that gives the images only when the layer reads the
flattened pixels; after a convolutional stem it gives the stem's features, which no metric of
the images can score (the audit then says the attack does not apply).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gradleak.attacks.base import ServerView


@dataclass(frozen=True)
class PixelLayer:
    """The first linear layer (reading C x H x W pixels), whether a ReLU follows it, and the
    classifier right after that ReLU when there is one (which SPEAR certifies against)."""

    name: str
    out_features: int
    relu: bool
    head: str | None


def pixel_layer(view: ServerView) -> PixelLayer | str:
    """The layer, or why there is none: the model's first weight must be a linear layer that takes
    every pixel of an image."""
    modules = [(n, m) for n, m in view.model.named_modules() if not list(m.children())]
    weighted = [
        (i, n, m)
        for i, (n, m) in enumerate(modules)
        if any(True for _ in m.parameters(recurse=False))
    ]
    if not weighted:
        return "the model has no weights"
    i, name, first = weighted[0]
    pixels = int(torch.tensor(view.spec.shape).prod())
    if not isinstance(first, nn.Linear) or first.in_features != pixels:
        label = name or type(first).__name__
        return f"its first layer ({label}) is not a linear layer on the {pixels} pixels"
    if first.bias is None:
        return f"its first layer ({name}) has no bias (its gradient fixes the scale)"
    after = [m for _, m in modules[i + 1 :] if not isinstance(m, nn.Dropout)]
    relu = bool(after) and isinstance(after[0], nn.ReLU)
    head = None
    rest = [(n, m) for n, m in modules[i + 2 :] if isinstance(m, nn.Linear)] if relu else []
    if (
        len(rest) == 1
        and rest[0][1].out_features == view.num_classes
        and rest[0][1].bias is not None
    ):
        head = rest[0][0]
    return PixelLayer(name, first.out_features, relu, head)


def to_images(view: ServerView, rows: torch.Tensor) -> torch.Tensor:
    """Recovered layer inputs (B x pixels, normalised as the model reads them) as images in [0,
    1]."""
    spec = view.spec
    c = spec.shape[0]
    x = rows.float().reshape(len(rows), *spec.shape)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, c, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, c, 1, 1)
    return (x * std + mean).clamp(0, 1)
