"""The exact batch attacks as attacks on a server's view: SPEAR (Dimitrov et al., NeurIPS 2024)
and the Cocktail Party Attack (Kariyappa et al., ICML 2023), registered in ``attacks.ATTACKS``
as ``spear`` and ``cpa``. Both need the update of one local step (the pseudo-gradient is then the
gradient of the batch's mean loss) and a linear layer on the pixels (``layers.pixel_layer``)."""

from __future__ import annotations

import time
from typing import Any

import torch

from gradleak.attacks.base import Progress, Reconstruction, ServerView
from gradleak.attacks.exact.cpa import cocktail_party_attack
from gradleak.attacks.exact.layers import PixelLayer, pixel_layer, to_images
from gradleak.attacks.exact.spear import spear
from gradleak.errors import ConfigError


def _not_applicable(view: ServerView, *, relu: bool) -> str | None:
    """Why an attack on the pixel layer cannot run on ``view`` (None: it can): images, one local
    step, a linear layer on the pixels (followed by a ReLU when ``relu``), at least as many
    neurons as images."""
    if getattr(view.spec, "kind", None) != "image":
        return f"recovers images; the examples are {getattr(view.spec, 'kind', 'unknown')}"
    if view.meta.steps != 1:
        return f"needs the update of one local step; this one took {view.meta.steps}"
    layer = pixel_layer(view)
    if isinstance(layer, str):
        return layer
    if relu and not layer.relu:
        return f"its first layer ({layer.name}) is not followed by a ReLU"
    if view.num_examples > layer.out_features:
        return f"{view.num_examples} images exceed the first layer's {layer.out_features} neurons"
    return None


class Spear:
    """SPEAR on the pixel layer: exact images (certified by recomputing the gradients in float64
    when the classifier follows the ReLU), or a declared failure with the directions found."""

    name = "spear"
    wants_labels = False

    def __init__(self, time_limit: float = 60.0, method: str = "auto") -> None:
        if time_limit <= 0:
            raise ConfigError("attack.time_limit", "must be > 0")
        if method not in ("auto", "lifted", "sampling"):
            raise ConfigError("attack.method", f"{method!r} is not one of auto, lifted, sampling")
        self.time_limit, self.method = time_limit, method

    def applies(self, view: ServerView) -> str | None:
        return _not_applicable(view, relu=True)

    def refuses(self, training: Any) -> tuple[str, str] | None:
        return None

    def run(
        self,
        view: ServerView,
        *,
        seed: int = 0,
        prior: torch.Tensor | None = None,
        progress: Progress | None = None,
        device: Any = "cpu",
    ) -> Reconstruction:
        layer = pixel_layer(view)
        assert isinstance(layer, PixelLayer)
        g, w = view.pseudo_gradient(), view.global_state
        head = {}
        if layer.head is not None:
            h = layer.head
            head = dict(
                head_weight=w[f"{h}.weight"],
                head_bias=w[f"{h}.bias"],
                head_grad_weight=g[f"{h}.weight"],
                head_grad_bias=g[f"{h}.bias"],
            )
        n = layer.name
        res = spear(
            w[f"{n}.weight"],
            w[f"{n}.bias"],
            g[f"{n}.weight"],
            g[f"{n}.bias"],
            view.num_examples,
            method=self.method,
            time_limit=self.time_limit,
            seed=seed,
            **head,
        )
        found = f"{res.directions_found} of {res.batch_size} directions"
        if res.inputs is None:
            return Reconstruction(
                None,
                None,
                "none",
                feasible=False,
                reason=f"{res.reason} ({found})",
                confidence=0.0,
                seconds=res.seconds,
            )
        labels = res.labels.long() if res.labels is not None else None
        return Reconstruction(
            to_images(view, res.inputs),
            labels,
            "spear" if labels is not None else "none",
            reason=f"{res.reason} ({found}, {res.method})",
            confidence=1.0 if res.certified else 0.5,
            seconds=res.seconds,
        )


class CocktailParty:
    """The Cocktail Party Attack on the pixel layer: ICA unmixes its weight gradient into the
    batch's images (sign and scale from the bias gradient). No certainty of its own."""

    name = "cpa"
    wants_labels = False

    def applies(self, view: ServerView) -> str | None:
        return _not_applicable(view, relu=False)

    def refuses(self, training: Any) -> tuple[str, str] | None:
        return None

    def run(
        self,
        view: ServerView,
        *,
        seed: int = 0,
        prior: torch.Tensor | None = None,
        progress: Progress | None = None,
        device: Any = "cpu",
    ) -> Reconstruction:
        start = time.perf_counter()
        layer = pixel_layer(view)
        assert isinstance(layer, PixelLayer)
        g = view.pseudo_gradient()
        res = cocktail_party_attack(
            g[f"{layer.name}.weight"],
            view.num_examples,
            grad_bias=g[f"{layer.name}.bias"],
            image_shape=view.spec.shape,
            seed=seed,
        )
        return Reconstruction(
            to_images(view, res.inputs),
            None,
            "none",
            reason=res.reason,
            seconds=time.perf_counter() - start,
        )
