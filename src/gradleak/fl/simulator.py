"""The in-process FL simulator: R rounds over C clients, one process, no storage of its own.

Persistence and display happen in hooks, so the runner (or a test) decides what is written where,
and an engine adapter can replace this loop while reusing ``train_client`` and the strategy.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from gradleak.data.dataset import Dataset
from gradleak.data.partition import ClientData
from gradleak.fl.client import LocalTraining, train_client
from gradleak.fl.filters import FilterContext, Filtered, UpdateFilter, apply_filters
from gradleak.fl.server import Strategy, evaluate, recalibrate_batch_norm
from gradleak.fl.update import ClientUpdate
from gradleak.modality import InputSpec, Task
from gradleak.seeding import numpy_rng


@dataclass(frozen=True)
class ClientResult:
    """One client's work in one round, as the run records it."""

    update: ClientUpdate  # as it left the client, after the filters
    train_loss: float
    withheld: bool
    record: dict[str, Any]
    seconds: float = 0.0
    # The update's norm when the update itself did not reach the server (withheld on an engine
    # whose clients send an error instead); None: computed from ``update``.
    norm: float | None = None

    BASE_KEYS = (
        "round",
        "client",
        "num_samples",
        "batch_size",
        "lr",
        "epochs",
        "steps",
        "train_loss",
        "update_norm",
        "withheld",
    )

    def row(self) -> dict[str, Any]:
        """The deterministic result row (wall-clock time is kept apart); filters add ``record``."""
        m = self.update.meta
        return {
            "round": m.round,
            "client": m.client_id,
            "num_samples": m.num_samples,
            "batch_size": m.batch_size,
            "lr": m.lr,
            "epochs": m.epochs,
            "steps": m.steps,
            "train_loss": self.train_loss,
            "update_norm": self.update.l2_norm() if self.norm is None else self.norm,
            "withheld": self.withheld,
            **self.record,
        }

    @classmethod
    def from_row(cls, row: dict[str, Any], update: ClientUpdate) -> ClientResult:
        """Rebuild a finished result from its row and its saved update (used on resume)."""
        record = {k: v for k, v in row.items() if k not in cls.BASE_KEYS}
        return cls(update, row["train_loss"], row["withheld"], record)


@dataclass(frozen=True)
class RoundResult:
    round: int
    clients: list[int]
    aggregated: int
    test_accuracy: float
    test_loss: float
    observed: dict[str, torch.Tensor] | None = (
        None  # what a secure-sum server learns (not a row field)
    )

    def row(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "clients": self.clients,
            "aggregated": self.aggregated,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
        }


class Hooks(Protocol):
    def round_started(self, round: int, clients: Sequence[ClientData]) -> None: ...
    def client_done(self, result: ClientResult) -> None: ...
    def round_done(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None: ...


class Simulator:
    """Runs rounds: sample clients, train each locally, filter, aggregate, evaluate."""

    # True when a round is one protocol run that cannot be continued from some of its clients
    # (secure aggregation on an engine): a resume then repeats the whole round.
    atomic_rounds = False

    def __init__(
        self,
        *,
        model: nn.Module,
        clients: Sequence[ClientData],
        test: Dataset,
        spec: InputSpec,
        task: Task,
        strategy: Strategy,
        training: LocalTraining,
        seed: int,
        clients_per_round: float = 1.0,
        filters: Sequence[UpdateFilter] = (),
        device: torch.device | str = "cpu",
        recalibrate_bn: bool = False,
    ) -> None:
        """``recalibrate_bn``: after aggregating, the server recomputes the global model's
        batch-norm running statistics on its public data (``fl.server.recalibrate_batch_norm``)."""
        self.model = model
        self.clients = list(clients)
        self.test = test
        self.spec, self.task = spec, task
        self.strategy = strategy
        self.training = training
        self.seed = seed
        self.clients_per_round = clients_per_round
        self.filters = list(filters)
        self.device = device
        self.recalibrate_bn = recalibrate_bn

    def participants(self, round: int) -> list[ClientData]:
        """The clients of a round: all, or a seeded random fraction (at least one)."""
        if self.clients_per_round >= 1.0:
            return self.clients
        k = participant_count(self.clients_per_round, len(self.clients))
        pick = numpy_rng(self.seed, "participants", round).choice(
            len(self.clients), k, replace=False
        )
        return [self.clients[i] for i in sorted(pick)]

    def participation(self, round: int, client_id: int) -> int:
        """In how many of rounds 1..round the client takes part (derived, so resumes agree)."""
        if self.clients_per_round >= 1.0:
            return round
        return sum(
            any(c.client_id == client_id for c in self.participants(r)) for r in range(1, round + 1)
        )

    def train(
        self, round: int, global_state: dict[str, torch.Tensor], client: ClientData
    ) -> tuple[ClientUpdate, float]:
        """The client's local training: (its raw update, its mean loss)."""
        return train_client(
            self.model,
            global_state,
            client,
            round=round,
            settings=self.training,
            spec=self.spec,
            task=self.task,
            seed=self.seed,
            device=self.device,
        )

    def filter(
        self,
        round: int,
        global_state: dict[str, torch.Tensor],
        client: ClientData,
        update: ClientUpdate,
    ) -> Filtered:
        """The update filters (defences, then the audit) on the client's way out: the update the
        server would receive, with what the filters recorded and whether one withholds it."""
        ctx = FilterContext(
            round=round,
            client=client,
            global_state=global_state,
            seed=self.seed,
            participation=self.participation(round, client.client_id),
        )
        return apply_filters(self.filters, update, ctx)

    def run_client(
        self, round: int, global_state: dict[str, torch.Tensor], client: ClientData
    ) -> ClientResult:
        start = time.perf_counter()
        update, loss = self.train(round, global_state, client)
        out = self.filter(round, global_state, client, update)
        return ClientResult(out.update, loss, out.withhold, out.record, time.perf_counter() - start)

    def run_clients(
        self, round: int, global_state: dict[str, torch.Tensor], clients: Sequence[ClientData]
    ) -> Iterator[ClientResult]:
        """The round's work of ``clients``, yielded in their order as each finishes (so the
        caller records each at once). An engine adapter overrides this to dispatch the work."""
        for client in clients:
            yield self.run_client(round, global_state, client)

    def observe(self, round: int, kept: Sequence[ClientUpdate]) -> dict[str, torch.Tensor] | None:
        """What the server learns of the round when it cannot see the updates (the strategy's
        observation: their sum), or None when it sees them. An engine whose protocol computes the
        sum itself (SecAgg+) returns that instead."""
        return self.strategy.observation(kept)

    def run(
        self,
        state: dict[str, torch.Tensor],
        *,
        first_round: int,
        last_round: int,
        hooks: Hooks,
        done: Mapping[int, ClientResult] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run rounds ``first_round..last_round`` from ``state``; return the final global state.

        ``done`` holds results of ``first_round`` that an interrupted run already finished; those
        clients are not trained again.
        """
        for r in range(first_round, last_round + 1):
            chosen = self.participants(r)
            hooks.round_started(r, chosen)
            prior = dict(done or {}) if r == first_round else {}
            fresh = self.run_clients(r, state, [c for c in chosen if c.client_id not in prior])
            results = []
            for client in chosen:
                result = prior.get(client.client_id)
                if result is None:
                    result = next(fresh)
                    hooks.client_done(result)
                results.append(result)
            kept = [res.update for res in results if not res.withheld]
            observed = self.observe(r, kept)
            if observed is None:
                state = self.strategy.aggregate(state, kept)
            else:
                state = self.strategy.aggregate_observed(state, observed, len(kept))
            if self.recalibrate_bn:
                state = recalibrate_batch_norm(
                    self.model, state, self.test, self.spec, device=self.device
                )
            acc, loss = evaluate(
                self.model, state, self.test, self.spec, self.task, device=self.device
            )
            hooks.round_done(
                RoundResult(r, [c.client_id for c in chosen], len(kept), acc, loss, observed), state
            )
        return state


def round_half_up(x: float) -> int:
    return int(x + 0.5)


def participant_count(fraction: float, num_clients: int) -> int:
    """How many of ``num_clients`` a round draws with ``clients_per_round = fraction``."""
    return num_clients if fraction >= 1.0 else max(1, round_half_up(fraction * num_clients))
