"""What a client process of an engine holds: the experiment rebuilt from its config, once."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gradleak.data.partition import ClientData
from gradleak.errors import GradleakError
from gradleak.fl.simulator import ClientResult, Simulator
from gradleak.fl.update import ClientUpdate, UpdateMeta

_SIDES: dict[tuple[str, str], Simulator] = {}


def client_simulator(config_json: str, run_dir: str) -> Simulator:
    """The experiment as a client process sees it (built once per process): the clients' data, the
    model, the local-training settings and the update filters (the audit writing under
    ``run_dir``), with torch's threads pinned to ``engine.threads``."""
    key = (config_json, run_dir)
    if key not in _SIDES:
        from gradleak.experiments.config import ExperimentConfig
        from gradleak.experiments.runner import build_scenario

        config = ExperimentConfig.model_validate(json.loads(config_json))
        if config.engine.threads:
            torch.set_num_threads(config.engine.threads)
        from gradleak.rundir import OwnedDir

        _SIDES[key] = build_scenario(config).simulator(OwnedDir(Path(run_dir), "run").join(), engine="local")
    return _SIDES[key]


def find_client(sim: Simulator, client_id: int) -> ClientData:
    for c in sim.clients:
        if c.client_id == client_id:
            return c
    raise GradleakError(f"no client {client_id} in this experiment")


# What travels beside an update from an engine's client to its server: the row's fields
# (train_loss, seconds; after the filters record, withheld, norm) with the update's metadata.


def with_meta(update: ClientUpdate, fields: dict[str, Any]) -> dict[str, Any]:
    """``fields`` plus the update's metadata and buffer names, as sent with (or instead of) it."""
    return {**fields, "meta": asdict(update.meta), "buffers": sorted(update.buffers)}


def update_from(delta: dict[str, torch.Tensor], fields: dict[str, Any]) -> ClientUpdate:
    """The update that ``with_meta(update, ...)`` described, with ``delta`` as received."""
    return ClientUpdate(delta, UpdateMeta(**fields["meta"]), frozenset(fields["buffers"]))


def result_from(delta: dict[str, torch.Tensor], fields: dict[str, Any]) -> ClientResult:
    """The server's ``ClientResult`` of a filtered reply (empty ``delta``: the update was not seen)."""
    f = fields
    return ClientResult(update_from(delta, f), f["train_loss"], f["withheld"], f["record"], f["seconds"], f["norm"])
