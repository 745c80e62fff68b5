"""The client-side update filter interface shared by defences and the leakage audit.

A filter takes the update about to leave a client and returns the update to send, like NVFlare's
filters and Flower's mods. Filters run in config order; the last one's output is what the server
receives. A filter may withhold the update (``context.withheld = True``) and may add fields to the
round's result row (``context.record``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gradleak.data.partition import ClientData
from gradleak.fl.update import ClientUpdate


@dataclass
class FilterContext:
    """What a filter may know beyond the update. ``client`` is ground truth: only metrics read it."""

    round: int
    client: ClientData
    global_state: dict[str, torch.Tensor]
    seed: int = 0  # the experiment's seed, for filters that draw random numbers
    participation: int = 1  # rounds this client has taken part in so far, this one included
    record: dict[str, Any] = field(default_factory=dict)
    withheld: bool = False


class UpdateFilter(Protocol):
    def __call__(self, update: ClientUpdate, context: FilterContext) -> ClientUpdate:
        """Return the update to pass on (a new object; the input is left as it was)."""
        ...


def apply_filters(
    filters: list[UpdateFilter], update: ClientUpdate, context: FilterContext
) -> ClientUpdate:
    for f in filters:
        update = f(update, context)
    return update
