"""Gradient disaggregation (Lam et al., ICML 2021): who took part when, and each client's update,
from the round sums of secure aggregation and the clients' participation counts. See ``core``."""

from __future__ import annotations

import numpy as np

from gradleak.attacks.disaggregation.constraints import (
    IllPosed,
    Interval,
    ParticipationLog,
    window_counts,
)
from gradleak.attacks.disaggregation.core import (
    GAP_MAX,
    ColumnJournal,
    Confidence,
    Disaggregation,
    SolverFailure,
    UncertainColumns,
    disaggregate,
)


def participation_columns(
    sums: np.ndarray,
    counts: np.ndarray | ParticipationLog,
    window: int | None = None,
    *,
    only: list[int],
    **kwargs,
) -> dict[int, np.ndarray]:
    """The participation columns of the clients in ``only`` (column index -> T vector of 0/1),
    solved alone (to time large federations client by client); arguments as ``disaggregate``."""
    result = disaggregate(sums, counts, window, only=only, **kwargs)
    return {k: result.participation[:, k] for k in only}


__all__ = [
    "GAP_MAX",
    "ColumnJournal",
    "Confidence",
    "Disaggregation",
    "IllPosed",
    "Interval",
    "ParticipationLog",
    "SolverFailure",
    "UncertainColumns",
    "disaggregate",
    "participation_columns",
    "window_counts",
]
