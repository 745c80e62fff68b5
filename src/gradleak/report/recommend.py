"""Which defence strength a sweep recommends: the smallest that meets the leakage target while
keeping the accuracy within a budget of the baseline (the smallest swept value, e.g. sigma0 = 0).

A point meets the leakage target when every audited client's worst RDLV over the audited rounds
is at most ``level``; a point whose training diverged therefore cannot be recommended through its
leakage alone, because its accuracy is judged too. When no point meets both, there is no
recommendation, and the verdict says which condition failed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recommendation:
    key: str
    level: float  # RDLV every audited client must reach or go below
    budget: float  # accuracy (a fraction, 0.05 = 5 points) a defence may cost against the baseline
    baseline_value: Any
    baseline_accuracy: float
    value: Any | None  # the recommended value, None when no point qualifies
    accuracy: float | None
    smallest_private: dict[str, Any] | None  # the smallest value meeting the leakage target alone

    @property
    def accuracy_cost(self) -> float | None:
        return None if self.accuracy is None else self.baseline_accuracy - self.accuracy

    def verdict(self) -> str:
        """One plain sentence (or two) for the report."""
        target = f"every audited client's RDLV at {self.level:g} or below in every audited round"
        budget = (
            f"an accuracy cost of at most {100 * self.budget:g} points against {self.key} = "
            f"{self.baseline_value} ({self.baseline_accuracy:.4f})"
        )
        if self.value is not None:
            return (
                f"Recommended: {self.key} = {self.value}, the smallest value with {target} and "
                f"{budget}: final test accuracy {self.accuracy:.4f} (cost "
                f"{100 * self.accuracy_cost:+.1f} points)."
            )
        if self.smallest_private is None:
            return f"No recommendation: no swept value reaches {target}."
        p = self.smallest_private
        return (
            f"No recommendation: no swept value has both {target} and {budget}. The smallest value "
            f"that meets the leakage target, {self.key} = {p['value']}, reaches a final test "
            "accuracy "
            f"of {p['accuracy']:.4f} (cost {100 * (self.baseline_accuracy - p['accuracy']):+.1f} "
            "points)."
        )


def recommend(
    points: list[dict[str, Any]], key: str, *, level: float, budget: float
) -> Recommendation:
    """The recommendation over sweep points ordered by ``key`` (each point: ``values``,
    ``accuracy`` and ``rdlv``, the worst RDLV per audited client)."""
    ordered = sorted(points, key=lambda p: p["values"][key])
    base = ordered[0]

    def private(p: dict[str, Any]) -> bool:
        return bool(p["rdlv"]) and all(v <= level for v in p["rdlv"].values())

    def affordable(p: dict[str, Any]) -> bool:
        acc = p["accuracy"]
        return math.isfinite(acc) and acc >= base["accuracy"] - budget - 1e-12

    first_private = next((p for p in ordered if private(p)), None)
    chosen = next((p for p in ordered if private(p) and affordable(p)), None)
    return Recommendation(
        key=key,
        level=level,
        budget=budget,
        baseline_value=base["values"][key],
        baseline_accuracy=base["accuracy"],
        value=chosen["values"][key] if chosen else None,
        accuracy=chosen["accuracy"] if chosen else None,
        smallest_private=None
        if first_private is None
        else {"value": first_private["values"][key], "accuracy": first_private["accuracy"]},
    )
