"""What an honest-but-curious server sees of one client's round, and what an attack returns.

``ServerView`` holds the architecture, the global weights, the update as it left the client and
the protocol metadata. It has no field for client data: ground truth reaches only the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from gradleak.fl.update import ClientUpdate, UpdateMeta, UpdateMismatch, check_state


@dataclass(frozen=True)
class ServerView:
    """The server's side of one (round, client): no images, no labels unless the protocol sends them."""

    model: nn.Module
    global_state: dict[str, torch.Tensor]
    update: dict[str, torch.Tensor]
    meta: UpdateMeta
    image_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    known_labels: torch.Tensor | None = None  # only where the threat model says the server knows them

    def __post_init__(self) -> None:
        reference = self.model.state_dict()
        check_state(reference, self.global_state, "global model", finite=False)
        check_state(reference, self.update, "update", finite=False)
        if self.meta.bn_mode not in (None, "train", "eval"):
            raise UpdateMismatch(f"bn_mode must be 'train' or 'eval', got {self.meta.bn_mode!r}")
        if len(self.mean) != self.image_shape[0] or len(self.std) != self.image_shape[0]:
            raise UpdateMismatch(
                f"normalisation has {len(self.mean)} means and {len(self.std)} stds "
                f"for {self.image_shape[0]}-channel images"
            )

    @classmethod
    def of(cls, model: nn.Module, global_state: dict[str, torch.Tensor], update: ClientUpdate,
           **kwargs) -> ServerView:  # fmt: skip
        """The view of a simulated client's update (keyword arguments as the fields)."""
        return cls(model=model, global_state=global_state, update=update.delta, meta=update.meta, **kwargs)

    @property
    def num_images(self) -> int:
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
        bias = f"{prefix}bias" if getattr(self.model.get_submodule(last), "bias", None) is not None else None
        return f"{prefix}weight", bias


@dataclass
class Reconstruction:
    """An attack's result: images in [0, 1], labels, and how the optimisation went."""

    images: torch.Tensor  # N x C x H x W in [0, 1]
    labels: torch.Tensor  # N
    label_strategy: str
    prior: torch.Tensor  # the starting images of the chosen restart, N x C x H x W in [0, 1]
    restart_scores: list[float]  # final objective of each restart; the lowest was chosen
    match_scores: list[float] = field(default_factory=list)  # final matching term of each restart
    trace: list[float] = field(default_factory=list)  # total loss of the chosen restart
    iterations: int = 0
    seconds: float = 0.0
