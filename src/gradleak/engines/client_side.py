"""What a client process of an engine holds: the experiment rebuilt from its config, once."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from gradleak.data.partition import ClientData
from gradleak.errors import GradleakError
from gradleak.fl.simulator import Simulator

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
        _SIDES[key] = build_scenario(config).simulator(Path(run_dir), engine="local")
    return _SIDES[key]


def find_client(sim: Simulator, client_id: int) -> ClientData:
    for c in sim.clients:
        if c.client_id == client_id:
            return c
    raise GradleakError(f"no client {client_id} in this experiment")
