"""What a client process of an engine holds: the experiment rebuilt from its config, once."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gradleak.data.partition import ClientData
from gradleak.errors import GradleakError
from gradleak.fl.simulator import ClientResult, Simulator
from gradleak.fl.update import ClientUpdate, UpdateMeta

log = logging.getLogger("gradleak")

_SIDES: dict[tuple[str, str], Simulator] = {}


def client_config_json(config: Any) -> str:
    """The config as an engine's client processes receive it: ``engine.threads`` left unset is
    resolved to this process's torch thread count, so that every client computes with the threads
    an in-process run uses (a sum over 1 or 2 threads differs in the 8th digit; equal counts give
    identical results on every engine)."""
    threads = config.engine.threads or torch.get_num_threads()
    engine = config.engine.model_copy(update={"threads": threads})
    return config.model_copy(update={"engine": engine}).model_dump_json()


def client_simulator(config_json: str, run_dir: str) -> Simulator:
    """The experiment as a client process sees it (built once per process): the clients' data, the
    model, the local-training settings and the update filters (the audit writing under
    ``run_dir``), with torch's threads pinned to ``engine.threads``."""
    key = (config_json, run_dir)
    if key not in _SIDES:
        from gradleak.experiments.config import ExperimentConfig
        from gradleak.experiments.scenario import build_scenario

        config = ExperimentConfig.model_validate(json.loads(config_json))
        if config.engine.threads:
            torch.set_num_threads(config.engine.threads)
        from gradleak.rundir import OwnedDir

        _SIDES[key] = build_scenario(config).simulator(
            OwnedDir(Path(run_dir), "run").join(), engine="local"
        )
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


def filter_leaving(
    locate: Callable[[], tuple[Simulator, int, dict[str, torch.Tensor], int]],
    update: ClientUpdate,
    fields: dict[str, Any],
    started: float,
    extra: Callable[[ClientUpdate], dict[str, Any]] | None = None,
) -> tuple[ClientUpdate, bool]:
    """The experiment's update filters on an update leaving a client, as every engine's filter hook
    runs them: ``locate()`` gives (the client's simulator, round, global state, client id); the
    row's fields (record, withheld, norm, seconds) are updated in ``fields``; returns (the update to
    send, whether it is withheld). A failure withholds the update (failing closed) and is recorded
    as ``filter_error``, never raised into the engine."""
    try:
        sim, round, global_state, client_id = locate()
        out = sim.filter(round, global_state, find_client(sim, client_id), update)
        update, record, withheld = out.update, dict(out.record), out.withhold
        if extra is not None:
            record.update(extra(update))
    except Exception as exc:  # noqa: BLE001 - recorded in the row; the federation goes on
        log.exception("gradleak's update filters failed")
        record, withheld = {"filter_error": f"{type(exc).__name__}: {exc}"}, True
    fields.update(
        record=record,
        withheld=withheld,
        norm=update.l2_norm(),
        seconds=fields["seconds"] + time.perf_counter() - started,
    )
    return update, withheld


def result_from(delta: dict[str, torch.Tensor], fields: dict[str, Any]) -> ClientResult:
    """The server's ``ClientResult`` of a filtered reply (empty ``delta``: the update was not
    seen)."""
    f = fields
    return ClientResult(
        update_from(delta, f), f["train_loss"], f["withheld"], f["record"], f["seconds"], f["norm"]
    )
