"""The attack protocol: what an honest-but-curious server sees of one client's round
(``ServerView``), what an attack returns (``Reconstruction``), and the registry of attacks.

``ServerView`` holds the architecture, the global weights, the update as it left the client, the
protocol metadata and the input spec of the examples. It has no field for client data: ground truth
reaches only the metrics. An attack is anything with ``applies(view)`` and ``run(view, ...)``;
families (optimisation, exact, disaggregation) live in packages of their own and register their
attacks by name in ``ATTACKS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from gradleak.fl.knowledge import Known
from gradleak.fl.update import ClientUpdate, UpdateMeta, UpdateMismatch, check_state
from gradleak.modality import InputSpec
from gradleak.registry import Registry

Progress = Callable[[int, float], None]


@dataclass(frozen=True)
class ServerView:
    """The server's side of one (round, client): no examples, no labels unless the protocol sends
    them."""

    model: nn.Module
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    meta: UpdateMeta
    spec: InputSpec  # what an example is (the client's input pipeline, which the server knows)
    num_classes: int
    known_labels: torch.Tensor | None = (
        None  # only where the threat model says the server knows them
    )
    # The defences the client's filters applied, as the (public) defence protocol tells the
    # server: each filter's record, in order (``fl.knowledge``); read by the adaptive attacks.
    known_defenses: tuple[Known, ...] = ()

    def __post_init__(self) -> None:
        reference = self.model.state_dict()
        check_state(reference, self.global_state, "global model", finite=False)
        check_state(reference, self.update, "update", finite=False)
        if self.meta.bn_mode not in (None, "train", "eval"):
            raise UpdateMismatch(f"bn_mode must be 'train' or 'eval', got {self.meta.bn_mode!r}")

    @classmethod
    def of(
        cls, model: nn.Module, global_state: dict[str, torch.Tensor], update: ClientUpdate, **kwargs
    ) -> ServerView:
        """The view of a simulated client's update (keyword arguments as the fields): what the
        server receives of it (``ClientUpdate.sent``: no entry it sees only inside a secure sum)."""
        return cls(
            model=model, global_state=global_state, update=update.sent(), meta=update.meta, **kwargs
        )

    @property
    def num_examples(self) -> int:
        return self.meta.num_samples

    @property
    def parameter_names(self) -> list[str]:
        return [n for n, _ in self.model.named_parameters()]

    @property
    def buffer_names(self) -> list[str]:
        return [n for n, _ in self.model.named_buffers()]

    @property
    def bn_mode(self) -> str:
        """How the client's batch-norm layers ran: "train" or "eval" (running statistics).

        The metadata's ``bn_mode`` when the protocol sent it; otherwise inferred from the update:
        "eval" when every running mean and variance is unchanged (a layer in train mode always
        moves them), else "train". A model without batch norm reports "train".
        """
        if self.meta.bn_mode is not None:
            return self.meta.bn_mode
        stats = [n for n in self.buffer_names if n.endswith((".running_mean", ".running_var"))]
        if stats and all(not bool(self.update[n].any()) for n in stats):
            return "eval"
        return "train"

    def pseudo_gradient(self) -> dict[str, torch.Tensor]:
        """``-delta / lr`` per parameter: the gradient itself after one SGD step, the sum of the
        step gradients after several (without momentum)."""
        return {n: -self.update[n].float() / self.meta.lr for n in self.parameter_names}

    def classifier(self) -> tuple[str, str | None]:
        """Names of the last linear layer's weight and bias (the one with num_classes outputs)."""
        last = None
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear) and module.out_features == self.num_classes:
                last = name
        if last is None:
            raise UpdateMismatch(f"the model has no linear layer with {self.num_classes} outputs")
        prefix = f"{last}." if last else ""
        bias = (
            f"{prefix}bias"
            if getattr(self.model.get_submodule(last), "bias", None) is not None
            else None
        )
        return f"{prefix}weight", bias


@dataclass
class Reconstruction:
    """An attack's result: the examples it recovered (in the input spec's format), their labels,
    and what it knows of its own success."""

    examples: torch.Tensor | None  # None when the attack declares it could not recover the batch
    labels: torch.Tensor | None
    label_strategy: str
    start: torch.Tensor | None = (
        None  # an optimisation's starting examples (chosen restart); None: exact
    )
    feasible: bool = (
        True  # False: the attack found the batch beyond its reach (``reason`` says why)
    )
    reason: str = ""
    confidence: float | None = None  # the attack's own certainty, where it has one
    restart_scores: list[float] = field(default_factory=list)  # final objective of each restart
    match_scores: list[float] = field(default_factory=list)  # final matching term of each restart
    trace: list[float] = field(default_factory=list)  # total loss of the chosen restart
    iterations: int = 0
    seconds: float = 0.0


@runtime_checkable
class Attack(Protocol):
    """An attack on one client's update, as the server sees it."""

    name: str
    wants_labels: bool  # the threat model gives the server the client's labels

    def applies(self, view: ServerView) -> str | None:
        """None when the attack can run on this view; else why not (the model, the metadata)."""
        ...

    def refuses(self, training: Any) -> tuple[str, str] | None:
        """(config key, problem) when the federation's training settings leave the attack nothing
        to work with (checked before any training); None otherwise."""
        ...

    def run(
        self,
        view: ServerView,
        *,
        seed: int = 0,
        prior: torch.Tensor | None = None,
        progress: Progress | None = None,
        device: Any = "cpu",
    ) -> Reconstruction:
        """Attack the view; ``prior``: what the server would guess without the update."""
        ...


# name -> a factory of the attack taking the settings it may change (``audit.attack``).
ATTACKS: Registry[Callable[..., Attack]] = Registry("attack preset")

# An attack registered as NAME + ADAPTIVE is NAME's counterpart that reads the view's known
# defences; the audit runs it beside NAME whenever a defence is on.
ADAPTIVE = "-adaptive"
