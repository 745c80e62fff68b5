"""Compression of the update: magnitude pruning and quantisation.

Neither gives a formal guarantee: they remove or coarsen information an attack matches, and the
audit measures how much that helps. Both act on trained parameters only; buffers pass unchanged.
The server knows both (``fl.knowledge``): an adaptive attack matches only the coordinates a pruning
kept, and each quantised value only up to its cell.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from gradleak.defenses.base import DefenseConfig, fields, trained, with_delta
from gradleak.fl.filters import FilterContext, Filtered
from gradleak.fl.knowledge import Pruned, Quantized
from gradleak.fl.update import ClientUpdate


def prune_tensor(v: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the ``floor(sparsity x numel)`` entries of smallest magnitude (ties by position)."""
    k = int(sparsity * v.numel())
    if k == 0:
        return v.clone()
    flat = v.flatten().clone()
    order = torch.argsort(flat.abs(), stable=True)
    flat[order[:k]] = 0
    return flat.view_as(v)


def quantize_tensor(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """fp16: round to half precision; int8: symmetric per-tensor scale max|v| / 127, round."""
    if fmt == "fp16":
        return v.half().to(v.dtype)
    scale = float(v.abs().max()) / 127
    if scale == 0:
        return v.clone()
    return (torch.round(v / scale).clamp(-127, 127) * scale).to(v.dtype)


@dataclass(frozen=True)
class _Prune:
    index: int
    sparsity: float

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> Filtered:
        names = trained(update)
        changes = {k: prune_tensor(update.delta[k], self.sparsity) for k in names}
        zeros = sum(int((v == 0).sum()) for v in changes.values())
        fraction = zeros / max(1, sum(v.numel() for v in changes.values()))
        known = (Pruned(tuple(names), self.sparsity),) if self.sparsity > 0 else ()
        return Filtered(
            with_delta(update, changes),
            fields(self.index, pruned_fraction=fraction),
            known=known,
        )


@dataclass(frozen=True)
class _Quantize:
    index: int
    fmt: Literal["fp16", "int8"]

    def __call__(self, update: ClientUpdate, ctx: FilterContext) -> Filtered:
        names = trained(update)
        return Filtered(
            with_delta(update, {k: quantize_tensor(update.delta[k], self.fmt) for k in names}),
            known=(Quantized(tuple(names), self.fmt),),
        )


class Prune(DefenseConfig):
    """Magnitude pruning: in every parameter tensor, zero the given fraction of smallest entries."""

    name: Literal["prune"] = "prune"
    sparsity: float = Field(
        ge=0, lt=1, description="Fraction of each tensor's entries set to zero."
    )

    def build(self, *, index: int, sample_rate: float) -> _Prune:
        return _Prune(index, self.sparsity)


class Quantize(DefenseConfig):
    """Quantisation of every parameter tensor to fp16 or to int8 (symmetric, per tensor)."""

    name: Literal["quantize"] = "quantize"
    format: Literal["fp16", "int8"] = Field("int8", description="fp16 or int8.")

    def build(self, *, index: int, sample_rate: float) -> _Quantize:
        return _Quantize(index, self.format)
