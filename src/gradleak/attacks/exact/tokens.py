"""The batch's token set from the gradient of the input embedding table.

An embedding lookup sends gradient only to the rows of the tokens it looked up, so in an update of
an untied input embedding the rows that changed are exactly the tokens the client's batch held
(Melis et al., S&P 2019; the first step of FILM, DAGER's token filter and LAMP). What it gives: a
set, with no order, positions or counts; each member is certain (a row moves only when its token
was looked up, whatever the number of local steps of plain SGD or momentum). What it misses: a row
whose change is smaller than half a unit in the last place of its float32 weight is rounded away
when the client sends ``new - old`` (rare tokens under a small learning rate), so recall can fall
below 1 while precision stays 1. Where it cannot be read: a table tied to the output layer (GPT-2:
the language-model head's gradient reaches every row), frozen embeddings (LoRA), or an update in
which more rows moved than the batch has tokens (noise, weight decay, tied weights by another
route); each is reported as infeasible with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["TokenSet", "embedding_name", "embedding_tokens"]


@dataclass(frozen=True)
class TokenSet:
    """The tokens whose embedding row changed, most changed first (``tokens``), or why none can
    be read (``feasible`` False, ``reason``). ``weights``: each token's row norm in the update."""

    feasible: bool
    reason: str
    tokens: tuple[int, ...] = ()
    weights: tuple[float, ...] = ()


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def embedding_name(model: nn.Module) -> tuple[str | None, str]:
    """(the state-dict name of the input embedding table, "") or (None, why it cannot be read)."""
    base = _base(model)
    table = base.get_input_embeddings().weight
    output = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if output is not None and getattr(output, "weight", None) is table:
        return None, (
            "the input embeddings are tied to the output layer, whose gradient reaches every row"
        )
    for name, p in model.named_parameters():
        if p is table:
            if not p.requires_grad:
                return None, "the input embeddings are frozen (not part of the update)"
            return name, ""
    return None, "the input embedding table is not among the model's parameters"


@torch.no_grad()
def embedding_tokens(
    model: nn.Module, update: dict[str, torch.Tensor], *, max_tokens: int
) -> TokenSet:
    """The token set of the batch behind ``update`` (state-dict names; a delta or a gradient, any
    scale). ``max_tokens``: how many tokens the batch holds (sequences x length); more moved rows
    than that means the rows do not come from the lookups alone."""
    name, why = embedding_name(model)
    if name is None:
        return TokenSet(False, why)
    if name not in update:
        return TokenSet(False, f"the update has no {name}")
    rows = update[name].double()
    if not bool(torch.isfinite(rows).all()):
        return TokenSet(False, f"{name} holds non-finite values")
    norms = rows.norm(dim=1)
    moved = torch.nonzero(norms > 0).flatten()
    if moved.numel() == 0:
        return TokenSet(False, f"no row of {name} changed")
    if moved.numel() > max_tokens:
        return TokenSet(
            False,
            f"{moved.numel()} of {len(norms)} embedding rows changed, more than the batch's "
            f"{max_tokens} tokens (noise, weight decay or a tied output layer)",
        )
    order = moved[torch.argsort(norms[moved], descending=True, stable=True)]
    return TokenSet(
        True,
        f"{order.numel()} tokens changed the embedding rows of {name}",
        tuple(int(t) for t in order),
        tuple(float(norms[t]) for t in order),
    )
