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

    def engine_problem(self, engine: str) -> str | None:
        """Why this defence cannot run on ``engine`` (``engine.name``); None when it can."""
        return None


def trained(update: ClientUpdate) -> list[str]:
    """Names of the trained parameters (buffers excluded)."""
    return [k for k in update.delta if k not in update.buffers]


def float_buffers(update: ClientUpdate) -> list[str]:
    """Floating-point buffers (batch-norm running statistics; never the integer counters)."""
    return [k for k in update.buffers if update.delta[k].is_floating_point()]


# The parameter groups of an update, as ``group-gaussian`` scales its noise.
GROUPS = ("weights", "bn-affine", "bn-stats", "classifier")


def parameter_groups(update: ClientUpdate) -> dict[str, str]:
    """Each noisable tensor's group, from the update's names alone: ``bn-stats`` the floating-point
    buffers (running mean and variance), ``bn-affine`` the weight and bias of a layer that has
    running statistics, ``classifier`` the last two-dimensional parameter (the last linear layer's
    weight) and its layer's bias, ``weights`` every other parameter. Integer buffers (counters)
    are in no group."""
    out = {k: "bn-stats" for k in float_buffers(update)}
    norm_layers = {k.rpartition(".")[0] for k in out}
    params = trained(update)
    matrices = [k for k in params if update.delta[k].ndim == 2]
    head = matrices[-1].rpartition(".")[0] if matrices else None
    for k in params:
        layer, _, leaf = k.rpartition(".")
        if layer in norm_layers and leaf in ("weight", "bias"):
            out[k] = "bn-affine"
        elif head is not None and layer == head and leaf in ("weight", "bias"):
            out[k] = "classifier"
        else:
            out[k] = "weights"
    return {k: out[k] for k in update.delta if k in out}  # the update's order


def with_delta(update: ClientUpdate, changes: dict[str, torch.Tensor]) -> ClientUpdate:
    """A new update with some tensors replaced (the input is left as it was)."""
    return replace(update, delta={**update.delta, **changes})


def generator(ctx: FilterContext, index: int) -> torch.Generator:
    """The noise stream of filter ``index`` for this (round, client): the same on every resume."""
    return torch_generator(ctx.seed, "defense", index, ctx.round, ctx.client.client_id)


def fields(index: int, **values: Any) -> dict[str, Any]:
    """Fields for the result row, suffixed with the filter's position after the first."""
    return {k if index == 0 else f"{k}_{index}": v for k, v in values.items()}


def group_fields(index: int, prefix: str, per_group: dict[str, Any]) -> dict[str, Any]:
    """One field per group, ``PREFIX_GROUP`` (``-`` as ``_``), e.g. ``noise_scale_bn_stats``,
    suffixed like ``fields``."""
    return fields(index, **{f"{prefix}_{g.replace('-', '_')}": v for g, v in per_group.items()})
