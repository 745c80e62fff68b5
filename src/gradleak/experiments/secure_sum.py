"""The chain on a secure-sum run: disaggregate the recorded round sums, then invert a client.

What the attacker uses is only what a secure-aggregation server has: the round sums it recorded
(``RUN/secure_sum/``), the participation counts per window of rounds (derived from the rounds
log, as a deployment's logs would give them), the global model of each round, and the metadata
the protocol sends with an update. The client's images reach only the metrics.

Output, all under ``RUN/disaggregation/``::

    summary.json          participation recovered (exact or not, wrong entries), solver time,
                          singular values, and one audit-style row per inverted client
    round_RRRR/client_C.{npz,png}   originals, starts and reconstructions of an inverted client
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import torch

from gradleak.attacks.disaggregation import ColumnJournal, disaggregate, window_counts
from gradleak.attacks.disaggregation.milp import check_solver
from gradleak.audit.filter import LeakageAudit
from gradleak.errors import ConfigError
from gradleak.experiments.store import RunStore
from gradleak.fl.update import ClientUpdate, UpdateMeta
from gradleak.safeio import parse_json
from gradleak.seeding import derive_seed

log = logging.getLogger("gradleak")

SUMMARY = "summary.json"


def check_config(config: Any) -> None:
    """Refuse a disaggregation section that cannot run (checked before any training)."""
    d = config.disaggregation
    if d is None:
        return
    if config.aggregation.strategy != "secure-sum":
        raise ConfigError(
            "disaggregation", "needs aggregation.strategy: secure-sum (the server must see sums)"
        )
    if d.invert and config.audit is None:
        raise ConfigError(
            "disaggregation.invert", "needs an audit: section (its attack and metric are used)"
        )
    unknown = [c for c in d.invert if not 1 <= c <= config.partition.num_clients]
    if unknown:
        raise ConfigError(
            "disaggregation.invert",
            f"client {unknown[0]} is not one of the run's clients "
            f"(1 to {config.partition.num_clients})",
        )
    rounds, clients = config.training.rounds, config.partition.num_clients
    if rounds < clients:  # the participation matrix needs a round per unknown column at least
        raise ConfigError(
            "training.rounds",
            f"disaggregation needs at least as many rounds as clients: "
            f"{rounds} rounds for {clients} clients",
        )
    check_solver(d.solver)  # a missing back-end fails now, not after training


def participation_matrix(store: RunStore, client_ids: list[int]) -> np.ndarray:
    """Rounds x clients, 1 where the client's update went into the round's sum (not withheld)."""
    rounds = store.rounds.read()
    withheld = {(r["round"], r["client"]) for r in store.results.read() if r.get("withheld")}
    col = {c: i for i, c in enumerate(client_ids)}
    p = np.zeros((len(rounds), len(client_ids)), dtype=np.int64)
    for t, row in enumerate(rounds):
        for c in row["clients"]:
            if (row["round"], c) not in withheld:
                p[t, col[c]] = 1
    return p


def stacked_sums(sums: list[dict[str, torch.Tensor]], keys: list[str]) -> np.ndarray:
    """Rounds x d: each round's sum flattened in the order of ``keys`` (zeros where nothing was
    summed)."""
    width = next(sum(s[k].numel() for k in keys) for s in sums if s)
    rows = [
        torch.cat([s[k].flatten() for k in keys]).numpy() if s else np.zeros(width) for s in sums
    ]
    return np.stack(rows).astype(np.float64)


def run_disaggregation(
    scenario: Any, store: RunStore, audit: LeakageAudit | None
) -> dict[str, Any]:
    """Disaggregate a finished secure-sum run and invert the chosen clients; write the summary.

    Raises the attack's IllPosed or SolverFailure (naming the client and rounds) rather than
    reporting a participation matrix the solver did not prove.
    """
    cfg = scenario.config.disaggregation
    summary_rel = f"disaggregation/{SUMMARY}"
    if store.dir.exists(summary_rel):
        return parse_json(
            store.dir.read_bytes(summary_rel, kind="json"), store.dir.path(summary_rel)
        )
    client_ids = [c.client_id for c in scenario.clients]
    truth = participation_matrix(store, client_ids)
    counts = window_counts(truth, cfg.window)
    sums = store.load_secure_sums()
    reference = scenario.model.state_dict()
    state0 = store.load_checkpoint(0, reference)
    keys = [k for k in state0 if state0[k].is_floating_point() and any(k in s for s in sums)]
    log.info(
        "disaggregating %d round sums of %d clients (windows of %d rounds)",
        len(sums),
        len(client_ids),
        cfg.window,
    )
    result = disaggregate(
        stacked_sums(sums, keys),
        counts,
        cfg.window,
        time_limit=cfg.time_limit,
        client_ids=client_ids,
        solver=cfg.solver,
        chunk=cfg.chunk,
        separation=cfg.separation,
        on_uncertain=cfg.on_uncertain,
        workers=cfg.workers,
        journal=ColumnJournal(store.dir.sub("disaggregation")),
    )
    wrong = int((result.participation != truth).sum())
    summary: dict[str, Any] = {
        "rounds": len(sums),
        "clients": len(client_ids),
        "window": cfg.window,
        "dimensions": int(sum(state0[k].numel() for k in keys)),
        "participation_exact": wrong == 0,
        "wrong_entries": wrong,
        "clients_exact": int((result.participation == truth).all(0).sum()),
        "seconds": result.seconds,
        "singular_values": [float(v) for v in result.singular_values[: len(client_ids) + 2]],
        "chunks": [list(c) for c in result.chunks],
        "certain_clients": int(result.certain.sum()),
        "per_client": [
            {
                **row,
                "client": client_ids[row["client"]],
                "exact": bool((result.participation[:, i] == truth[:, i]).all()),
            }
            for i, row in enumerate(result.per_client())
        ],
        "inverted": [],
    }
    rows = store.results.read()
    for cid in cfg.invert:
        summary["inverted"].append(
            _invert(scenario, store, audit, result, client_ids.index(cid), keys, rows)
        )
    store.dir.write_text(summary_rel, json.dumps(summary, indent=2))
    log.info(
        "disaggregation: participation %s (%d wrong entries) in %.1f s",
        "exact" if wrong == 0 else "not exact",
        wrong,
        result.seconds,
    )
    return summary


def _invert(
    scenario: Any,
    store: RunStore,
    audit: LeakageAudit,
    result: Any,
    col: int,
    keys: list[str],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    """Attack client ``col``'s recovered update against the global model of the middle round it
    (by the recovered participation) took part in; score it like an audit row."""
    client = scenario.clients[col]
    cid = client.client_id
    taken = np.flatnonzero(result.participation[:, col]) + 1
    if len(taken) == 0:
        return {"client": cid, "note": "recovered as never taking part; nothing to invert"}
    r = int(taken[len(taken) // 2])
    meta_rows = [row for row in rows if row["client"] == cid]
    meta_row = min(meta_rows, key=lambda row: abs(row["round"] - r))  # the protocol's metadata
    meta = UpdateMeta(
        client_id=cid,
        round=r,
        num_samples=meta_row["num_samples"],
        lr=meta_row["lr"],
        epochs=meta_row["epochs"],
        steps=meta_row["steps"],
        batch_size=meta_row["batch_size"],
        momentum=scenario.config.training.momentum,
    )
    state = store.load_checkpoint(r - 1, scenario.model.state_dict())
    flat = torch.from_numpy(result.updates[col])
    update, at = {k: torch.zeros_like(v) for k, v in state.items()}, 0
    for k in keys:  # the order stacked_sums flattened them in
        v = state[k]
        update[k] = flat[at : at + v.numel()].view_as(v).to(v.dtype)
        at += v.numel()
    buffers = frozenset(n for n, _ in audit.model.named_buffers())
    view = audit.view(state, ClientUpdate(update, meta, buffers), client.data.targets)
    seed = derive_seed(scenario.config.seed, "disaggregation", cid)
    record = audit.inspect(view, client.data.examples, client.data.targets, seed=seed)
    return {"client": cid, "round": r, "rounds_taken_part": len(taken), **record}
