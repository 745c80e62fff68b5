"""What defences share: a config that builds an update filter, and helpers on updates."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from gradleak.fl.filters import FilterContext, UpdateFilter
from gradleak.fl.update import ClientUpdate
from gradleak.schema import Section
from gradleak.seeding import torch_generator


class DefenseConfig(Section):
    """A defence as written in the config's ``defenses:`` list; ``build`` makes its filter."""

    def build(self, *, index: int, sample_rate: float) -> UpdateFilter:
        """The filter for position ``index`` of the list; ``sample_rate`` is the fraction of
        clients drawn per round (for privacy accounting)."""
        raise NotImplementedError


def trained(update: ClientUpdate) -> list[str]:
    """Names of the trained parameters (buffers excluded)."""
    return [k for k in update.delta if k not in update.buffers]


def float_buffers(update: ClientUpdate) -> list[str]:
    """Floating-point buffers (batch-norm running statistics; never the integer counters)."""
    return [k for k in update.buffers if update.delta[k].is_floating_point()]


def with_delta(update: ClientUpdate, changes: dict[str, torch.Tensor]) -> ClientUpdate:
    """A new update with some tensors replaced (the input is left as it was)."""
    return replace(update, delta={**update.delta, **changes})


def generator(ctx: FilterContext, index: int) -> torch.Generator:
    """The noise stream of filter ``index`` for this (round, client): the same on every resume."""
    return torch_generator(ctx.seed, "defense", index, ctx.round, ctx.client.client_id)


def fields(index: int, **values: Any) -> dict[str, Any]:
    """Fields for the result row, suffixed with the filter's position after the first."""
    return {k if index == 0 else f"{k}_{index}": v for k, v in values.items()}
