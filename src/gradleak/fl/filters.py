"""The client-side update filter interface shared by defences and the leakage audit.

A filter takes the update about to leave a client and returns what it found: the update to send,
the fields it adds to the round's result row, and whether it withholds the update (like NVFlare's
filters and Flower's mods, which answer with an error instead of the update). Filters run in config
order; the last one's update is what the server receives.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch

from gradleak.data.partition import ClientData
from gradleak.fl.knowledge import Known
from gradleak.fl.update import ClientUpdate


@dataclass(frozen=True)
class FilterContext:
    """What a filter may know beyond the update. ``client`` is ground truth: only metrics read
    it."""

    round: int
    client: ClientData
    global_state: dict[str, torch.Tensor]
    seed: int = 0  # the experiment's seed, for filters that draw random numbers
    participation: int = 1  # rounds this client has taken part in so far, this one included
    # What the server knows of the filters before this one (each one's record, in order): what an
    # audit hands its attacks, as the defence protocol is public.
    known: tuple[Known, ...] = ()


@dataclass(frozen=True)
class Filtered:
    """What a filter hands on: the update (a new object; the input is left as it was), the fields it
    adds to the result row, whether the update is withheld from aggregation, and what the server
    knows of what this filter did (``fl.knowledge``; empty when it changed nothing)."""

    update: ClientUpdate
    record: dict[str, Any] = field(default_factory=dict)
    withhold: bool = False
    known: tuple[Known, ...] = ()


class UpdateFilter(Protocol):
    def __call__(self, update: ClientUpdate, context: FilterContext) -> Filtered:
        """What this filter found in the update leaving the client."""
        ...


def apply_filters(
    filters: list[UpdateFilter], update: ClientUpdate, context: FilterContext
) -> Filtered:
    """The filters in order: the last update, every filter's fields, withheld if any withholds;
    each filter's context knows what the filters before it did (``FilterContext.known``)."""
    record: dict[str, Any] = {}
    withhold = False
    for f in filters:
        out = f(update, context)
        update, withhold = out.update, withhold or out.withhold
        record.update(out.record)
        if out.known:
            context = replace(context, known=context.known + out.known)
    return Filtered(update, record, withhold, context.known)
