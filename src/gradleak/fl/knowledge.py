"""What the server knows of the client-side defences (Kerckhoffs: the protocol is public).

Each defence filter that changes an update says what it did in a small immutable record; the
records reach the server's view of the update (``ServerView.known_defenses``) so that an attack
can adapt to the defence. A record holds no client data: which tensors a filter acted on, its
format, and its noise scales. The scale of a fixed-scale defence is part of the protocol; the scale
of an adaptive one (``adaptive-gaussian``, ``group-gaussian``) is a statistic of the client's update
that the server could estimate from the noisy update it receives, and the record gives it exactly:
the stronger server, as an audit should assume. What a record does not carry the server sees in the
update itself: the coordinates a pruning kept (the non-zero ones), an int8 tensor's scale (its
largest magnitude is 127 steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Pruned:
    """Magnitude pruning of ``names``: the coordinates it kept are the non-zero ones received."""

    names: tuple[str, ...]
    sparsity: float


@dataclass(frozen=True)
class Quantized:
    """Quantisation of ``names`` to ``format``: each received value stands for its cell (int8:
    +-scale/2 around it, the scale being the tensor's largest magnitude / 127; fp16: the values
    that round to it)."""

    names: tuple[str, ...]
    format: Literal["fp16", "int8"]


@dataclass(frozen=True)
class Noised:
    """Independent noise added per coordinate: ``scales`` maps a tensor's name to the Gaussian
    standard deviation or the Laplace scale b (std b x sqrt(2)); tensors not named got none."""

    kind: Literal["gaussian", "laplace"]
    scales: tuple[tuple[str, float], ...]

    def stds(self) -> dict[str, float]:
        """The noise's standard deviation per tensor."""
        factor = 1.0 if self.kind == "gaussian" else math.sqrt(2.0)
        return {name: factor * s for name, s in self.scales}


@dataclass(frozen=True)
class StatisticsWithheld:
    """No per-client batch-norm running-statistic change reaches the server: kept on the client
    (``local``), sent only into a sum over the round's clients (``secure-sum``), or zeroed by a
    defence that cannot bound them (``zeroed``, DP)."""

    names: tuple[str, ...]
    mode: Literal["local", "secure-sum", "zeroed"]


Known = Pruned | Quantized | Noised | StatisticsWithheld
