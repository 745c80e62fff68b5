"""Flower (on Ray) as the engine: every client a ClientApp, the update filters a mod.

The server side is a ``ServerApp`` whose main loop is gradleak's own ``Simulator.run``: it draws
the round's participants with gradleak's seeded rule, sends each one the global model, and turns
each reply into exactly the ``ClientResult`` the in-process run would have made, which the run
store records. The client side trains with ``Simulator.train``; ``filters_mod`` then applies
``Simulator.filter`` (the defences, then the audit) to the reply on its way out, as any Flower mod
would. An update the audit withholds leaves the client as an error reply that carries only its
result row (the update never reaches the server).

Under aggregation.strategy secure-sum every round is one run of Flower's SecAgg+ protocol
(``SecAggPlusWorkflow`` on the server, ``secaggplus_mod`` outermost on the clients): the server
records the round sums the protocol reveals and the clients' rows, and the disaggregation chain
runs on them as on an in-process secure-sum run.

Engine facts this relies on (flwr 1.41, ray 2.55): ``run_simulation`` runs in this process with
one Ray actor per concurrent client; node ids are random, so the server first asks every node
which partition (client) it holds; each actor process builds the experiment once from its config
(``client_side.client_simulator``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def _environment() -> None:
    """Flower's settings for a local simulation: no telemetry, no update check, a private home
    (read when flwr is imported)."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("FLWR_HOME", tempfile.mkdtemp(prefix="gradleak-flwr-"))


_environment()

import flwr.compat.common.recorddict_compat as compat  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.client.mod import secaggplus_mod  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import (  # noqa: E402
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)
from flwr.server import LegacyContext  # noqa: E402
from flwr.server.compat.grid_client_proxy import GridClientProxy  # noqa: E402
from flwr.server.strategy import Strategy as FlowerStrategy  # noqa: E402
from flwr.server.workflow import SecAggPlusWorkflow  # noqa: E402
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402

from gradleak.data.partition import ClientData  # noqa: E402
from gradleak.engines.client_side import (  # noqa: E402
    client_config_json,
    client_simulator,
    filter_leaving,
    find_client,
    result_from,
    update_from,
    with_meta,
)
from gradleak.errors import GradleakError  # noqa: E402
from gradleak.experiments.engines import SECAGG_MODULUS  # noqa: E402
from gradleak.fl.simulator import ClientResult, Hooks, Simulator  # noqa: E402
from gradleak.fl.update import ClientUpdate  # noqa: E402
from gradleak.seeding import derive_seed  # noqa: E402

# The record names of gradleak's messages.
GLOBAL, TASK, UPDATE, RESULT = "global", "task", "update", "gradleak"


def _quiet() -> None:
    """Flower's per-round and per-stage log lines, below warnings, stay out of the console."""
    logging.getLogger("flwr").setLevel(logging.WARNING)


# -- the messages ----------------------------------------------------------------------------------


class PlainMessages:
    """A plain round: the global model and the task in; the update and its row out (a withheld
    update leaves as an error reply that carries only its row)."""

    @staticmethod
    def task(msg: Any, sim: Simulator) -> tuple[int, int, dict[str, torch.Tensor]]:
        """(round, client id, global state) of a train message."""
        task = msg.content[TASK]
        return int(task["round"]), int(task["client"]), msg.content[GLOBAL].to_torch_state_dict()

    @staticmethod
    def reply(update: ClientUpdate, fields: dict[str, Any], msg: Any, sim: Simulator) -> Any:
        row = json.dumps(with_meta(update, fields))
        return Message(
            RecordDict(
                {
                    UPDATE: ArrayRecord(torch_state_dict=update.delta),
                    RESULT: ConfigRecord({"json": row}),
                }
            ),
            reply_to=msg,
        )

    @staticmethod
    def read(reply: Any, sim: Simulator) -> tuple[ClientUpdate, dict[str, Any]]:
        fields = json.loads(reply.content[RESULT]["json"])
        return update_from(reply.content[UPDATE].to_torch_state_dict(), fields), fields

    @staticmethod
    def withheld(update: ClientUpdate, fields: dict[str, Any], msg: Any, sim: Simulator) -> Any:
        return Message(Error(code=0, reason=json.dumps(with_meta(update, fields))), reply_to=msg)


class SecAggMessages:
    """A SecAgg+ round, in Flower's legacy fit messages (the only ones its SecAgg+ speaks): the
    global model as arrays in state-dict order in; the update out as float64 arrays, which
    ``secaggplus_mod`` clips, quantises and masks, with its row in the fit metrics, which SecAgg+
    leaves in clear. Every client weighs 1 (``num_examples``), so the protocol's weighted mean
    times the participants is the plain sum. A withheld update is sent as zeros: the client still
    takes part in the protocol, and the sum is that of the others."""

    @staticmethod
    def task(msg: Any, sim: Simulator) -> tuple[int, int, dict[str, torch.Tensor]]:
        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        arrays = parameters_to_ndarrays(fitins.parameters)
        state = {
            k: torch.from_numpy(a.copy())
            for k, a in zip(sim.model.state_dict(), arrays, strict=True)
        }
        return int(fitins.config["round"]), int(fitins.config["client"]), state

    @staticmethod
    def reply(update: ClientUpdate, fields: dict[str, Any], msg: Any, sim: Simulator) -> Any:
        m = update.meta
        arrays = [update.delta[k].double().numpy() for k in sim.model.state_dict()]
        # secaggplus_mod's stochastic rounding draws from numpy's global generator: seed it per
        # (round, client) so that a run's sums are reproducible.
        np.random.seed(derive_seed(sim.seed, "secagg", m.round, m.client_id) % 2**32)
        row = json.dumps(with_meta(update, fields))
        fit = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), 1, {"json": row})
        return Message(compat.fitres_to_recorddict(fit, keep_input=False), reply_to=msg)

    @staticmethod
    def read(reply: Any, sim: Simulator) -> tuple[ClientUpdate, dict[str, Any]]:
        fit = compat.recorddict_to_fitres(reply.content, keep_input=True)
        fields = json.loads(str(fit.metrics["json"]))
        state = sim.model.state_dict()
        arrays = parameters_to_ndarrays(fit.parameters)
        delta = {
            k: torch.from_numpy(a.copy()).to(state[k].dtype)
            for k, a in zip(state, arrays, strict=True)
        }
        return update_from(delta, fields), fields

    @staticmethod
    def withheld(update: ClientUpdate, fields: dict[str, Any], msg: Any, sim: Simulator) -> Any:
        zeros = ClientUpdate(
            {k: torch.zeros_like(v) for k, v in update.delta.items()}, update.meta, update.buffers
        )
        return SecAggMessages.reply(zeros, fields, msg, sim)


def clipped_fraction(update: ClientUpdate, clip: float) -> float:
    """The fraction of the update's values that SecAgg+ cuts to [-clip, clip]."""
    total = sum(v.numel() for v in update.delta.values())
    over = sum(int((v.double().abs() > clip).sum()) for v in update.delta.values())
    return over / max(total, 1)


# -- the client side (runs in Ray's actor processes) -----------------------------------------------


def client_app(config_json: str, run_dir: str, clip: float | None = None) -> Any:
    """The ClientApp: ``query`` answers with the node's client id, ``train`` trains it locally;
    ``filters_mod`` applies the experiment's update filters to every train reply. With ``clip``
    (SecAgg+'s clipping range) the rounds are SecAgg+ rounds: ``secaggplus_mod`` runs outermost
    and masks what leaves, and each row records the fraction of the update it clips."""
    secure = clip is not None
    codec: Any = SecAggMessages if secure else PlainMessages

    def filters_mod(msg: Message, context: Context, call_next: Any) -> Message:
        _quiet()
        reply = call_next(msg, context)
        if msg.metadata.message_type != "train" or reply.has_error():
            return reply
        start = time.perf_counter()
        sim = client_simulator(config_json, run_dir)
        update, fields = codec.read(reply, sim)

        def locate() -> tuple[Simulator, int, dict[str, torch.Tensor], int]:
            round, client_id, global_state = codec.task(msg, sim)
            return sim, round, global_state, client_id

        secagg = None if clip is None else (lambda u: {"secagg_clipped": clipped_fraction(u, clip)})
        update, withheld = filter_leaving(locate, update, fields, start, secagg)
        if withheld:  # the update stays on the client; the server learns only the row
            return codec.withheld(update, fields, msg, sim)
        return codec.reply(update, fields, msg, sim)

    app = ClientApp(mods=[secaggplus_mod, filters_mod] if secure else [filters_mod])

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        client_id = int(context.node_config["partition-id"]) + 1
        return Message(RecordDict({RESULT: ConfigRecord({"client": client_id})}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        start = time.perf_counter()
        sim = client_simulator(config_json, run_dir)
        round, client_id, global_state = codec.task(msg, sim)
        update, loss = sim.train(round, global_state, find_client(sim, client_id))
        return codec.reply(
            update, {"train_loss": loss, "seconds": time.perf_counter() - start}, msg, sim
        )

    return app


# -- the server side -------------------------------------------------------------------------------


class FlowerSimulator(Simulator):
    """``Simulator`` whose clients run as Flower ClientApps on Ray (same results, other processes).

    With ``secagg`` (the experiment's ``engine.secagg``, under aggregation.strategy secure-sum)
    every round is one run of Flower's SecAgg+ protocol: the server learns the round's sum (which
    ``observe`` returns, and the run records) and each client's row, never an update.
    """

    def __init__(
        self,
        *,
        config_json: str,
        run_dir: Path,
        cpus_per_client: float = 1.0,
        secagg: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.config_json, self.run_dir, self.cpus_per_client = config_json, run_dir, cpus_per_client
        self.secagg = secagg
        self.atomic_rounds = secagg is not None
        self._grid: Any = None
        self._context: Any = None
        self._nodes: dict[int, int] = {}
        self._sums: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def for_config(cls, config: Any, run_dir: Path, **kwargs: Any) -> FlowerSimulator:
        e, secure = config.engine, config.aggregation.strategy == "secure-sum"
        return cls(
            config_json=client_config_json(config),
            run_dir=run_dir,
            cpus_per_client=e.cpus_per_client,
            secagg=e.secagg if secure else None,
            **kwargs,
        )

    def run(self, state: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        """``Simulator.run`` inside a Flower ServerApp, with the clients on Flower's simulation."""
        _quiet()
        out: dict[str, Any] = {}
        server = ServerApp()

        @server.main()
        def main(grid: Grid, context: Context) -> None:
            try:
                self._grid, self._context = grid, context
                self._nodes = self._discover(grid)
                out["state"] = Simulator.run(self, state, **kwargs)
            except BaseException as exc:  # re-raised below, outside Flower's own handling
                out["error"] = exc

        clip = None if self.secagg is None else self.secagg.clip
        run_simulation(
            server_app=server,
            client_app=client_app(self.config_json, str(self.run_dir), clip),
            num_supernodes=len(self.clients),
            backend_config={
                "client_resources": {"num_cpus": self.cpus_per_client, "num_gpus": 0.0},
                "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
            },
        )
        if "error" in out:
            raise out["error"]
        if "state" not in out:
            raise GradleakError("the Flower simulation ended without running the federation")
        return out["state"]

    def _discover(self, grid: Any, timeout: float = 600.0) -> dict[int, int]:
        """{client id: node id}: wait for every node, then ask each which client it is."""
        deadline = time.monotonic() + timeout
        while len(nodes := list(grid.get_node_ids())) < len(self.clients):
            if time.monotonic() > deadline:
                raise GradleakError(
                    f"only {len(nodes)} of {len(self.clients)} Flower nodes started"
                )
            time.sleep(0.1)
        replies = grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=n, message_type="query") for n in nodes]
        )
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
        if self.secagg is not None:
            yield from self._secagg_round(round, global_state, clients)
            return
        tasks = [
            Message(
                RecordDict(
                    {
                        GLOBAL: ArrayRecord(torch_state_dict=global_state),
                        TASK: ConfigRecord({"round": round, "client": c.client_id}),
                    }
                ),
                dst_node_id=self._nodes[c.client_id],
                message_type="train",
                group_id=str(round),
            )
            for c in clients
        ]
        by_node = {r.metadata.src_node_id: r for r in self._grid.send_and_receive(tasks)}
        for c in clients:
            reply = by_node.get(self._nodes[c.client_id])
            if reply is None:
                raise GradleakError(f"round {round}: client {c.client_id} sent no reply")
            yield _decode(reply, round, c.client_id)

    def _secagg_round(
        self, round: int, global_state: dict[str, torch.Tensor], clients: Sequence[ClientData]
    ) -> Iterator[ClientResult]:
        """One SecAgg+ run with ``clients``: their rows (updates empty: the server never sees
        one), and the round's sum kept for ``observe``."""
        keys = list(global_state)
        params = ndarrays_to_parameters([global_state[k].numpy() for k in keys])
        tasks = {self._nodes[c.client_id]: {"round": round, "client": c.client_id} for c in clients}
        strategy = _SecAggRound(self._grid, self._context.run_id, tasks, params)
        context = LegacyContext(self._context, strategy=strategy)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            params, True
        )
        s = self.secagg
        SecAggPlusWorkflow(
            num_shares=s.shares,
            reconstruction_threshold=s.threshold,
            max_weight=1.0,
            clipping_range=s.clip,
            quantization_range=s.quantization,
            modulus_range=SECAGG_MODULUS,
        )(self._grid, context)
        if strategy.failures or strategy.results is None:
            why = "; ".join(str(f) for f in strategy.failures) or "too few clients answered"
            raise GradleakError(f"round {round}: the SecAgg+ round failed: {why}")
        rows = {}
        for proxy, fit in strategy.results:
            fields = json.loads(str(fit.metrics["json"]))
            rows[fields["meta"]["client_id"]] = fields
        if sorted(rows) != sorted(c.client_id for c in clients):
            raise GradleakError(f"round {round}: SecAgg+ answered for clients {sorted(rows)}")
        # The protocol reveals the mean over the participants (each weighs 1): the sum is n x it.
        mean = parameters_to_ndarrays(strategy.results[0][1].parameters)
        n = len(strategy.results)
        self._sums[round] = {k: torch.from_numpy(a * n) for k, a in zip(keys, mean, strict=True)}
        for c in clients:
            yield result_from({}, rows[c.client_id])

    def observe(self, round: int, kept: Sequence[ClientUpdate]) -> dict[str, torch.Tensor] | None:
        """Under SecAgg+, the sum its protocol revealed; otherwise the strategy's observation.
        Withheld clients sent zeros, so the sum is that of the ``kept`` updates either way."""
        if self.secagg is not None:
            total = self._sums.pop(round)
            return total if kept else {}
        return super().observe(round, kept)


class _SecAggRound(FlowerStrategy):  # type: ignore[misc]
    """The legacy Flower strategy that ``SecAggPlusWorkflow`` drives for one round: it sends the
    chosen nodes their tasks and keeps what the protocol reveals (nothing is aggregated here)."""

    def __init__(
        self, grid: Grid, run_id: int, tasks: dict[int, dict[str, int]], params: Any
    ) -> None:
        self.grid, self.run_id, self.tasks, self.params = grid, run_id, tasks, params
        self.results: list[Any] | None = None
        self.failures: list[Any] = []

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[Any]:
        return [
            (GridClientProxy(node, self.grid, self.run_id), FitIns(self.params, dict(task)))
            for node, task in self.tasks.items()
        ]

    def aggregate_fit(
        self, server_round: int, results: Any, failures: Any
    ) -> tuple[None, dict[str, Any]]:
        self.results, self.failures = list(results), list(failures)
        return None, {}

    def initialize_parameters(self, client_manager: Any) -> None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Any, client_manager: Any
    ) -> list[Any]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: Any, failures: Any
    ) -> tuple[None, dict[str, Any]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Any) -> None:
        return None


def _decode(reply: Any, round: int, client_id: int) -> ClientResult:
    """The ClientResult of one reply: an update with its row, or a withheld row (an error reply)."""
    if reply.has_error():
        try:
            fields = json.loads(reply.error.reason)
        except (TypeError, ValueError):
            raise GradleakError(
                f"round {round}: client {client_id} failed: {reply.error.reason}"
            ) from None
        return result_from({}, fields)
    return result_from(
        reply.content[UPDATE].to_torch_state_dict(), json.loads(reply.content[RESULT]["json"])
    )


__all__ = ["FlowerSimulator", "Hooks", "client_app"]
