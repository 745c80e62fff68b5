"""Flower (on Ray) as the engine: every client a ClientApp, the update filters a mod.

The server side is a ``ServerApp`` whose main loop is gradleak's own ``Simulator.run``: it draws
the round's participants with gradleak's seeded rule, sends each one the global model, and turns
each reply into exactly the ``ClientResult`` the in-process run would have made, which the run
store records. The client side trains with ``Simulator.train``; ``filters_mod`` then applies
``Simulator.filter`` (the defences, then the audit) to the reply on its way out, as any Flower mod
would. An
update the audit withholds leaves the client as an error reply that carries only its result row
(the update never reaches the server).

Engine facts this relies on (flwr 1.41, ray 2.55): ``run_simulation`` runs in this process with
one Ray actor per concurrent client; node ids are random, so the server first asks every node
which partition (client) it holds; each actor process builds the experiment once from its config
(``client_side.client_simulator``).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gradleak.data.partition import ClientData
from gradleak.engines.client_side import client_simulator, find_client
from gradleak.errors import GradleakError
from gradleak.fl.simulator import ClientResult, Hooks, Simulator
from gradleak.fl.update import ClientUpdate, UpdateMeta

# The record names of gradleak's messages.
GLOBAL, TASK, UPDATE, RESULT = "global", "task", "update", "gradleak"


def _environment() -> None:
    """Flower's settings for a local simulation: no telemetry, no update check, a private home."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="gradleak-flwr-"))


# -- the client side (runs in Ray's actor processes) ------------------------------------------------

def _update_reply(update: ClientUpdate, fields: dict[str, Any], to: Any) -> Any:
    """The reply to a train message: the update's tensors, and its metadata and row as JSON."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    fields = {**fields, "meta": asdict(update.meta), "buffers": sorted(update.buffers)}
    return Message(RecordDict({UPDATE: ArrayRecord(torch_state_dict=update.delta),
                               RESULT: ConfigRecord({"json": json.dumps(fields)})}), reply_to=to)  # fmt: skip


def _read_update(reply: Any) -> tuple[ClientUpdate, dict[str, Any]]:
    """(the update, the other fields) of a train reply made by ``_update_reply``."""
    fields = json.loads(reply.content[RESULT]["json"])
    update = ClientUpdate(reply.content[UPDATE].to_torch_state_dict(), UpdateMeta(**fields["meta"]),
                          frozenset(fields["buffers"]))  # fmt: skip
    return update, fields


def client_app(config_json: str, run_dir: str) -> Any:
    """The ClientApp: ``query`` answers with the node's client id, ``train`` trains it locally;
    ``filters_mod`` applies the experiment's update filters to every train reply."""
    from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
    from flwr.clientapp import ClientApp

    def filters_mod(msg: Message, context: Context, call_next: Any) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        start = time.perf_counter()
        sim = client_simulator(config_json, run_dir)
        update, fields = _read_update(reply)
        m = update.meta
        update, ctx = sim.filter(m.round, msg.content[GLOBAL].to_torch_state_dict(),
                                 find_client(sim, m.client_id), update)  # fmt: skip
        fields.update(record=ctx.record, withheld=ctx.withheld, norm=update.l2_norm(),
                      seconds=fields["seconds"] + time.perf_counter() - start)  # fmt: skip
        if ctx.withheld:  # the update stays on the client; the server learns only the row
            return Message(Error(code=0, reason=json.dumps(fields)), reply_to=msg)
        return _update_reply(update, fields, msg)

    app = ClientApp(mods=[filters_mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        client_id = int(context.node_config["partition-id"]) + 1
        return Message(RecordDict({RESULT: ConfigRecord({"client": client_id})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        sim = client_simulator(config_json, run_dir)
        task = msg.content[TASK]
        update, loss = sim.train(int(task["round"]), msg.content[GLOBAL].to_torch_state_dict(),
                                 find_client(sim, int(task["client"])))  # fmt: skip
        return _update_reply(update, {"train_loss": loss, "seconds": time.perf_counter() - start}, msg)

    return app


# -- the server side ---------------------------------------------------------------------------------


class FlowerSimulator(Simulator):
    """``Simulator`` whose clients run as Flower ClientApps on Ray (same results, other processes)."""

    def __init__(self, *, config_json: str, run_dir: Path, cpus_per_client: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_json, self.run_dir, self.cpus_per_client = config_json, run_dir, cpus_per_client
        self._grid: Any = None
        self._nodes: dict[int, int] = {}

    def run(self, state: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """``Simulator.run`` inside a Flower ServerApp, with the clients on Flower's simulation."""
        _environment()
        from flwr.app import Context
        from flwr.serverapp import Grid, ServerApp
        from flwr.simulation import run_simulation

        out: dict[str, Any] = {}
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                self._grid = grid
                self._nodes = self._discover(grid)
                out["state"] = Simulator.run(self, state, **kwargs)
            except BaseException as exc:  # re-raised below, outside Flower's own handling
                out["error"] = exc

        run_simulation(
            server_app=server, client_app=client_app(self.config_json, str(self.run_dir)),
            num_supernodes=len(self.clients),
            backend_config={"client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": 0.0},
                            "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False}},
        )  # fmt: skip
        if "error" in out:
            raise out["error"]
        if "state" not in out:
            raise GradleakError("the Flower simulation ended without running the federation")
        return out["state"]

    def _discover(self, grid: Any, timeout: float = 600.0) -> dict[int, int]:
        """{client id: node id}: wait for every node, then ask each which client it is."""
        from flwr.app import Message, RecordDict

        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < len(self.clients):
            if time.monotonic() > deadline:
                raise GradleakError(f"only {len(nodes)} of {len(self.clients)} Flower nodes started")
            time.sleep(0.1)
        replies = grid.send_and_receive([Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes])
        found = {}
        for reply in replies:
            if reply.has_error():
                raise GradleakError(f"a Flower node failed to start: {reply.error.reason}")
            found[int(reply.content[RESULT]["client"])] = reply.metadata.src_node_id
        return found

    def run_clients(
        self, round: int, global_state: dict[str, torch.Tensor], clients: Sequence[ClientData]
    ) -> Iterator[ClientResult]:
        """Send the round's tasks to the clients' nodes at once; yield the results in order."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        tasks = [Message(RecordDict({GLOBAL: ArrayRecord(torch_state_dict=global_state),
                                     TASK: ConfigRecord({"round": round, "client": c.client_id})}),
                         dst_node_id=self._nodes[c.client_id], message_type="train", group_id=str(round))
                 for c in clients]  # fmt: skip
        by_node = {r.metadata.src_node_id: r for r in self._grid.send_and_receive(tasks)}
        for c in clients:
            reply = by_node.get(self._nodes[c.client_id])
            if reply is None:
                raise GradleakError(f"round {round}: client {c.client_id} sent no reply")
            yield _decode(reply, round, c.client_id)


def _decode(reply: Any, round: int, client_id: int) -> ClientResult:
    """The ClientResult of one reply: an update with its row, or a withheld row (an error reply)."""
    if reply.has_error():
        try:
            fields = json.loads(reply.error.reason)
        except (TypeError, ValueError):
            raise GradleakError(f"round {round}: client {client_id} failed: {reply.error.reason}") from None
        update = ClientUpdate({}, UpdateMeta(**fields["meta"]), frozenset(fields["buffers"]))
        return ClientResult(update, fields["train_loss"], True, fields["record"], fields["seconds"], fields["norm"])
    update, fields = _read_update(reply)
    return ClientResult(update, fields["train_loss"], fields["withheld"], fields["record"], fields["seconds"])


__all__ = ["FlowerSimulator", "Hooks", "client_app"]
