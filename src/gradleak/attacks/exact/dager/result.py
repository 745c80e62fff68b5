"""What ``recover`` returns: the sequences, whether they can be trusted, and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from .calibrate import Cut, confidence_from_ratio

__all__ = ["LayerReport", "Result"]


@dataclass
class LayerReport:
    """Diagnostics of one span used by the attack.

    Attributes:
        stage: "layer1" (token sets) or "layer2" (sequence search).
        module: state-dict prefix of the module whose gradient gave the span.
        rank: dimension of the span used (the numerical rank, capped at the token count).
        dim: dimension of the space the span lives in (d, or the LoRA rank r).
        margin: the span is refused when rank >= dim - margin.
        threshold: accepted candidates lie below this distance (None before calibration).
        gap: smallest rejected / largest accepted distance over all candidates tested (>= 1 for
            a consistent cut; large is good).
        accepted: candidates accepted at this stage.
        max_accepted / min_rejected: the two distances that define ``gap``.
        numerical_rank: singular values >= rel_tol x the largest; above ``rank`` after several
            local steps or under noise.
        explained: share of this gradient's energy that the recovered sequences account for
            (~1 for a complete recovery, lower when text is missing or wrong or noise dominates).
    """

    stage: str
    module: str
    rank: int
    dim: int
    margin: int
    threshold: float | None = None
    gap: float | None = None
    accepted: int = 0
    max_accepted: float | None = None
    min_rejected: float | None = None
    numerical_rank: int | None = None
    explained: float | None = None

    @property
    def saturated(self) -> bool:
        return self.rank >= self.dim - self.margin

    @property
    def confidence(self) -> float:
        """min(1 - 1/gap, explained): the separation, capped by how much the text explains."""
        if self.gap is None:
            return 0.0
        sep = confidence_from_ratio(self.gap)
        return sep if self.explained is None else min(sep, self.explained)

    def record(self, cut: Cut, accepted: Tensor, rejected: Tensor) -> None:
        """Store the threshold and the separation actually achieved by the accepted set."""
        self.threshold = cut.threshold
        self.accepted = int(accepted.numel())
        self.max_accepted = float(accepted.max()) if accepted.numel() else None
        self.min_rejected = float(rejected.min()) if rejected.numel() else None
        if self.max_accepted is not None and self.min_rejected is not None:
            self.gap = self.min_rejected / max(self.max_accepted, 1e-300)
        else:
            self.gap = None


@dataclass
class Result:
    """Outcome of one recovery.

    Attributes:
        feasible: False when the gradient does not determine the batch (saturated span, no
            separation, defended update); ``sequences`` is then empty.
        reason: why infeasible, or a one-line summary when feasible.
        confidence: min over the stages used of min(1 - 1/gap, explained), in [0, 1].
        sequences: recovered token ids, best first (at most ``num_sequences``).
        seconds: wall-clock time of the recovery.
        layers: per-span diagnostics.
        scores: per sequence, its worst layer-2 distance (decoder), geometric-mean ffn distance
            (encoder) or worst layer-1 distance (encoder, one sequence).
    """

    feasible: bool
    reason: str
    confidence: float = 0.0
    sequences: list[list[int]] = field(default_factory=list)
    seconds: float = 0.0
    layers: list[LayerReport] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for results stores and benchmarks)."""
        return asdict(self)


def split_by(values: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """(values below threshold, values at or above it)."""
    below = values < threshold
    return values[below], values[~below]


def empty() -> Tensor:
    return torch.empty(0, dtype=torch.float64)
