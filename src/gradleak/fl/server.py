"""Server side: aggregation strategies (one overridable hook) and evaluation of the global model."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import nn

from gradleak.data.dataset import Dataset
from gradleak.fl.update import ClientUpdate
from gradleak.modality import InputSpec, Task
from gradleak.registry import Registry


class Strategy(ABC):
    """Turns the round's client updates into the next global state."""

    @abstractmethod
    def aggregate(
        self, global_state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        """Return the new global state (a new dict; ``global_state`` is not modified)."""

    def observation(self, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor] | None:
        """What the server learns of the round when it cannot see the individual updates (the
        run records it); None when it sees every update."""
        return None

    def aggregate_observed(
        self, global_state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor], count: int
    ) -> dict[str, torch.Tensor]:
        """The new global state from the round's observation alone (of ``count`` contributing
        clients), for strategies whose server sees no individual update."""
        raise NotImplementedError(f"{type(self).__name__} aggregates individual updates")


STRATEGIES: Registry[type[Strategy]] = Registry("aggregation strategy")


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    """FedAvg (McMahan et al., 2017): the sample-count-weighted mean of the updates.

    Applied to every entry, buffers included; integer buffers (batch-norm counters) get the
    rounded weighted mean. With no updates (all withheld) the global state stays as it was.
    """

    def aggregate(
        self, global_state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        if not updates:
            return {k: v.clone() for k, v in global_state.items()}
        weights = torch.tensor([u.meta.num_samples for u in updates], dtype=torch.float64)
        weights = weights / weights.sum()
        mean = {
            k: torch.tensordot(
                weights, torch.stack([u.delta[k].to(torch.float64) for u in updates]), dims=1
            )
            for k in global_state
        }
        return step(global_state, mean)


def step(
    global_state: dict[str, torch.Tensor], mean: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``global + mean`` per entry in float64, cast back; integer entries (batch-norm counters)
    move by the rounded mean."""
    new = {}
    for k, g in global_state.items():
        if g.is_floating_point():
            new[k] = (g.to(torch.float64) + mean[k]).to(g.dtype)
        else:
            new[k] = g + torch.round(mean[k]).to(g.dtype)
    return new


def recalibrate_batch_norm(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    public: Dataset,
    spec: InputSpec,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> dict[str, torch.Tensor]:
    """``state`` with every batch-norm layer's running mean and variance recomputed on the server's
    public examples: the layers in train mode with a cumulative average (momentum None) over
    batches of ``batch_size``, no gradient; parameters and counters as they were.

    Where the clients keep their statistics (``bn-stats-local``), the global model's stay at their
    initial values, and an evaluation in eval mode with them is meaningless; these are statistics of
    the data's kind from no client's data. The server's public data here is the test split, so the
    evaluation then normalises with its own examples' statistics: slightly optimistic."""
    norms = {
        n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
    }
    if not norms:
        return state
    model.load_state_dict(state)
    model.to(device).eval()
    momenta = {n: m.momentum for n, m in norms.items()}
    try:
        for m in norms.values():
            m.reset_running_stats()
            m.momentum = None
            m.train()
        x = spec.model_inputs(public.examples)
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                model(x[start : start + batch_size].to(device))
    finally:
        for n, m in norms.items():
            m.momentum = momenta[n]
        model.eval()
    new = dict(state)
    for n, m in norms.items():
        for buf in ("running_mean", "running_var"):
            new[f"{n}.{buf}"] = getattr(m, buf).detach().cpu().to(state[f"{n}.{buf}"].dtype).clone()
    return new


def evaluate(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    test: Dataset,
    spec: InputSpec,
    task: Task,
    *,
    device: torch.device | str = "cpu",
) -> tuple[float, float]:
    """(accuracy, mean loss) of the model with ``state`` on the test split, as ``task`` measures."""
    model.load_state_dict(state)
    model.to(device).eval()
    return task.evaluate(model, test, spec, device=device)


@STRATEGIES.register("secure-sum")
class SecureSum(Strategy):
    """Aggregation behind secure aggregation: the server learns only the round's sum of updates.

    Clients mask their updates so that only ``sum_k delta_k`` is revealed (which is recorded per
    round as the server's observation); the server steps by the mean, ``sum / participants``, so
    clients weigh equally (their sample counts stay hidden too). Gradient disaggregation
    (``gradleak.attacks.disaggregation``) shows what these sums still reveal over many rounds.
    """

    def observation(self, updates: Sequence[ClientUpdate]) -> dict[str, torch.Tensor] | None:
        if not updates:
            return {}
        return {
            k: torch.stack([u.delta[k].to(torch.float64) for u in updates]).sum(0)
            for k in updates[0].delta
        }

    def aggregate(
        self, global_state: dict[str, torch.Tensor], updates: Sequence[ClientUpdate]
    ) -> dict[str, torch.Tensor]:
        return self.aggregate_observed(global_state, self.observation(updates) or {}, len(updates))

    def aggregate_observed(
        self, global_state: dict[str, torch.Tensor], observed: dict[str, torch.Tensor], count: int
    ) -> dict[str, torch.Tensor]:
        """Step by the mean, ``sum / count``; no contribution leaves the model as it was."""
        if not count or not observed:
            return {k: v.clone() for k, v in global_state.items()}
        return step(global_state, {k: v / count for k, v in observed.items()})
