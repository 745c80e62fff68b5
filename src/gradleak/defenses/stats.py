"""Batch-norm running statistics kept from the server, FedBN-style (Li et al., ICLR 2021).

In train mode a client's running-statistic deltas reveal its own batch statistics at every layer:
for a one-image client, that image's per-channel means and variances, which is all the
``bn-statistics`` attack needs. This filter sends no per-client statistic change:

- ``mode: local``: the deltas of the running means and variances are zeroed, so the statistics
  stay on the client and this client does not move the global model's statistics (FedBN keeps
  them local; here the clients train in train mode, where running statistics play no part in the
  forward pass, so training is unchanged). If every client runs it, the global statistics stay at
  their initial values, and the server's evaluation in eval mode uses them: the runner measures
  what that costs (see the README).
- ``mode: secure-sum``: the deltas are sent only into a secure sum over the round's clients
  (``ClientUpdate.secure``): the global statistics become exactly what FedAvg would make of them,
  and the server never sees one client's. Only the in-process engine carries this (on Flower and
  NVFlare the update would travel in clear).

Guarantees: no per-client statistic reaches the server (in ``secure-sum`` mode: outside the round
sums, which gradient disaggregation may still pull apart when participation varies between rounds;
with every client in every round it cannot). Nothing about the other parameters: their updates
still leak through the update-matching attacks, and the audit's adaptive attacks use those.
Integer counters pass unchanged (they count steps, which the metadata sends anyway).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import Field

from gradleak.defenses.base import DefenseConfig, fields, float_buffers, with_delta
from gradleak.fl.filters import FilterContext, Filtered
from gradleak.fl.knowledge import StatisticsWithheld
from gradleak.fl.update import ClientUpdate


@dataclass(frozen=True)
class _StatsFilter:
    index: int
    mode: Literal["local", "secure-sum"]

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> Filtered:
        names = float_buffers(update)
        if not names:
            return Filtered(update)
        if self.mode == "local":
            out = with_delta(update, {k: torch.zeros_like(update.delta[k]) for k in names})
        else:
            out = replace(update, secure=update.secure | frozenset(names))
        found = fields(self.index, bn_stats_withheld=self.mode)
        return Filtered(out, found, known=(StatisticsWithheld(tuple(names), self.mode),))


class BatchNormStatsLocal(DefenseConfig):
    """No per-client batch-norm statistic change leaves the client (kept local, or secure-summed).

    ``local``: the running means and variances stay on the client; ``secure-sum``: they are sent
    only into a secure sum over the round's clients (the module's docstring says what each
    guarantees)."""

    name: Literal["bn-stats-local"] = "bn-stats-local"
    mode: Literal["local", "secure-sum"] = Field(
        "local",
        description="local: the statistics stay on the client (the global model's are not moved "
        "by it); secure-sum: they reach the global model only as a sum over the round's clients "
        "(in-process engine only).",
    )

    def engine_problem(self, engine: str) -> str | None:
        if self.mode == "secure-sum" and engine != "inprocess":
            return (
                f"mode secure-sum needs the in-process engine: on {engine} each client's "
                "statistics would travel to the server in clear"
            )
        return None

    def build(self, *, index: int, sample_rate: float) -> _StatsFilter:
        return _StatsFilter(index, self.mode)
