"""Client-side local training: from the global model, E epochs of mini-batch SGD on private data.

A pure function of its arguments (no simulator state), so any engine adapter can call it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from gradleak.data.partition import ClientData
from gradleak.fl.update import ClientUpdate, UpdateMeta
from gradleak.modality import InputSpec, Task
from gradleak.seeding import torch_generator


@dataclass(frozen=True)
class LocalTraining:
    """Local optimiser settings shared by all clients (a client may override ``lr``)."""

    epochs: int = 1
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    batch_norm: str = (
        "train"  # "train": batch statistics, buffers updated; "eval": frozen running statistics
    )


def set_batch_norm_mode(model: nn.Module, mode: str) -> None:
    """Put every batch-norm layer in ``mode`` ("train" or "eval"), the rest of the model
    unchanged."""
    if mode not in ("train", "eval"):
        raise ValueError(f"batch-norm mode must be 'train' or 'eval', got {mode!r}")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train(mode == "train")


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    """Mini-batches per epoch; the last one may be smaller (nothing is dropped)."""
    return math.ceil(num_samples / batch_size)


def train_client(
    model: nn.Module,
    global_state: dict[str, torch.Tensor],
    client: ClientData,
    *,
    round: int,
    settings: LocalTraining,
    spec: InputSpec,
    task: Task,
    seed: int,
    device: torch.device | str = "cpu",
) -> tuple[ClientUpdate, float]:
    """Train ``model`` from ``global_state`` on the client's data; return (update, mean loss).

    The batch order is drawn from a seed derived from (seed, round, client id), so a client's
    work in a round is the same whenever and wherever it runs.
    """
    device = torch.device(device)
    model.load_state_dict(global_state)
    model.to(device).train()
    set_batch_norm_mode(model, settings.batch_norm)
    lr = client.lr if client.lr is not None else settings.lr
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    x = spec.model_inputs(client.data.examples).to(device)
    y = client.data.targets.to(device)
    n, bs = len(y), client.batch_size
    gen = torch_generator(seed, "client", round, client.client_id)
    losses = []
    for _ in range(settings.epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for start in range(0, n, bs):
            idx = perm[start : start + bs]
            loss = task.loss(model, x[idx], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    local = model.state_dict()
    delta = {k: (v.detach().cpu() - global_state[k]).contiguous() for k, v in local.items()}
    buffers = frozenset(name for name, _ in model.named_buffers())
    meta = UpdateMeta(
        client_id=client.client_id,
        round=round,
        num_samples=n,
        lr=lr,
        epochs=settings.epochs,
        steps=settings.epochs * steps_per_epoch(n, bs),
        batch_size=bs,
        momentum=settings.momentum,
        bn_mode=settings.batch_norm,
    )
    return ClientUpdate(delta, meta, buffers), float(torch.stack(losses).mean())
