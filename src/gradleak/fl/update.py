"""What leaves a client: the update (weight and buffer differences) and the protocol metadata."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class UpdateMeta:
    """Metadata the FL protocol sends with an update; an honest-but-curious server sees all of it."""

    client_id: int
    round: int
    num_samples: int
    lr: float
    epochs: int
    steps: int
    batch_size: int
    momentum: float = 0.0
    # How the client's batch-norm layers ran: "train" (batch statistics, running statistics
    # updated) or "eval" (running statistics, buffers unchanged); None: not sent, so a server
    # infers it from the update (``ServerView.bn_mode``).
    bn_mode: str | None = None


@dataclass(frozen=True)
class ClientUpdate:
    """``delta[k] = local[k] - global[k]`` for every parameter and every buffer of the model.

    ``buffers`` names the entries that are buffers (batch-norm running statistics and counters),
    not trained parameters, so that defences and aggregators can treat them apart.
    """

    delta: dict[str, torch.Tensor]
    meta: UpdateMeta
    buffers: frozenset[str] = field(default_factory=frozenset)

    def parameters(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.delta.items() if k not in self.buffers}

    def l2_norm(self) -> float:
        """L2 norm over the trained parameters (buffers excluded), independent of key order."""
        return math.fsum(float(v.double().pow(2).sum()) for v in self.parameters().values()) ** 0.5

    def save(self, path: Path) -> None:
        """Write as safetensors, metadata in the header; atomic (write, then rename)."""
        tmp = path.with_suffix(".tmp")
        meta = {"meta": json.dumps(asdict(self.meta)), "buffers": json.dumps(sorted(self.buffers))}
        save_file({k: v.contiguous() for k, v in self.delta.items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ClientUpdate:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = f.metadata()
        return cls(
            delta=load_file(str(path)),
            meta=UpdateMeta(**json.loads(header["meta"])),
            buffers=frozenset(json.loads(header["buffers"])),
        )
