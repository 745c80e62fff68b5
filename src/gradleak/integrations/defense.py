"""gradleak's defences on one update of the user's own model, outside gradleak's federation.

``UpdateDefense`` takes a ``defenses:`` entry as a config would write it (``{"name":
"dp-gaussian", "clip": 1.0, "noise_multiplier": 1.0}``) and applies that very filter to the
difference between the weights a client is about to send and the global weights it received: the
same code, seeded noise and accounting as in a gradleak run. Framework adapters (the Flower
``defense_mod``) wrap it; it knows nothing of a framework's messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from pydantic import TypeAdapter, ValidationError

from gradleak.data.dataset import Dataset
from gradleak.data.partition import ClientData
from gradleak.defenses import Defense, DefenseConfig
from gradleak.fl.filters import FilterContext
from gradleak.fl.update import ClientUpdate, UpdateMeta, check_state
from gradleak.integrations.auditor import as_tensors
from gradleak.integrations.models import ModelSpec, model_factory
from gradleak.schema import one_line


def defense_config(defense: Mapping[str, Any] | DefenseConfig) -> DefenseConfig:
    """A ``defenses:`` entry, checked as the config schema checks it (one ``ConfigError``)."""
    if isinstance(defense, DefenseConfig):
        return defense
    try:
        return TypeAdapter(Defense).validate_python(dict(defense))
    except ValidationError as exc:
        raise one_line(exc, "defense") from None


_NO_DATA = Dataset(torch.empty(0), torch.empty(0, dtype=torch.long))


@dataclass(frozen=True)
class Defended:
    """The weights to send (the received arrays' names and dtypes) and the fields the defence
    reports (``dp_epsilon``, ``noise_scale``, ...)."""

    weights: dict[str, np.ndarray]
    fields: dict[str, Any]


class UpdateDefense:
    """One gradleak defence for the updates of one model.

    Args:
        defense: a ``defenses:`` entry (dict) or a built defence config.
        model: the app's model (class, factory, class path or model-spec dict): it tells the
            trained parameters from the buffers (batch-norm statistics), as defences treat them
            apart.
        seed: the noise stream's seed (with the round and the client: each draw reproducible).
        sample_rate: the fraction of clients drawn per round, for DP accounting.
    """

    def __init__(
        self,
        defense: Mapping[str, Any] | DefenseConfig,
        model: ModelSpec,
        *,
        seed: int = 0,
        sample_rate: float = 1.0,
    ) -> None:
        self.config = defense_config(defense)
        self.filter = self.config.build(index=0, sample_rate=sample_rate)
        reference = model_factory(model)()
        self.reference = reference.state_dict()
        self.buffers = frozenset(k for k, _ in reference.named_buffers())
        self.seed = seed

    def apply(
        self,
        global_state: Mapping[str, Any],
        weights: Mapping[str, Any],
        *,
        round: int,
        client_id: int,
        participation: int = 1,
    ) -> Defended:
        """The defended weights: ``global + filter(weights - global)``, cast back to each array's
        dtype. ``participation``: rounds this client has sent so far, this one included."""
        glob = as_tensors(global_state, self.reference)
        new = as_tensors(weights, self.reference)
        check_state(self.reference, glob, "global model")
        check_state(self.reference, new, "update")
        delta = {k: new[k] - glob[k] for k in self.reference}
        meta = UpdateMeta(client_id, round, 0, 1.0, 1, 1, 1)
        ctx = FilterContext(
            round=round,
            client=ClientData(client_id, _NO_DATA, 1),  # a defence reads only the client's id
            global_state=glob,
            seed=self.seed,
            participation=participation,
        )
        out = self.filter(ClientUpdate(delta, meta, self.buffers), ctx)
        sent = {k: (glob[k] + out.update.delta[k]).to(new[k].dtype).numpy() for k in self.reference}
        kinds = {k: np.asarray(weights[k]).dtype for k in weights}
        return Defended({k: sent[k].astype(kinds[k], copy=False) for k in weights}, out.record)


__all__ = ["Defended", "UpdateDefense", "defense_config"]
