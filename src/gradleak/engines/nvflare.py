"""NVIDIA FLARE as the engine: gradleak's loop as the server's controller, the client filters as
NVFlare filters, the experiment as a job in NVFlare's simulator.

The job built from an experiment config (``build_job``) holds:

- on the server, ``GradleakController`` (a ``ModelController``): its ``run`` is gradleak's own
  ``Simulator.run``, which draws each round's participants, sends them the global model
  (``send_model_and_wait``), aggregates the replies with gradleak's arithmetic and records them
  through the run store (the recording aggregator: reports, resume and sweeps work unchanged);
- on each client site ``site-K`` (client K), ``GradleakTrainer`` (an ``Executor``: local training
  with ``Simulator.train``), ``GlobalModelCapture`` (a task-data filter: the result filter cannot
  see the global model, NVFlare clears the task data before it runs) and ``UpdateFilters`` (the
  task-result filter: the defences, then the audit, ``Simulator.filter``). A withheld update leaves
  as an empty DXO with only its row, as NVFlare's own RDLV filter withholds. An exception inside
  the filter never aborts the job: it is caught, the update withheld (failing closed) and the
  error recorded in the row as ``filter_error``.

A job of the user's own (their executor, their model) takes gradleak's audit through
``gradleak.integrations.nvflare`` instead, which needs no gradleak config.

NVFlare's simulator runs the job in processes of its own: the server process writes the run
directory (the ``gradleak run`` process that started the job holds its lock meanwhile), and every
component is rebuilt there from its constructor arguments, which each keeps as attributes of the
same name (NVFlare's job API reads them back).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from nvflare.apis.dxo import DXO, DataKind, from_shareable
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.executor import Executor
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.signal import Signal
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.fuel.utils.log_utils import default_log_dict
from nvflare.job_config.api import FedJob
from nvflare.job_config.defs import FilterType
from nvflare.recipe.sim_env import SimEnv

from gradleak.data.partition import ClientData
from gradleak.engines.client_side import (
    client_config_json,
    client_simulator,
    filter_leaving,
    find_client,
    result_from,
    update_from,
    with_meta,
)
from gradleak.errors import GradleakError
from gradleak.fl.simulator import ClientResult, RoundResult, Simulator
from gradleak.fl.update import ClientUpdate, UpdateMeta

TASK = "train"
ROW = "gradleak"  # the DXO meta key of a client's row (JSON)

# site name -> (round, global state) of the task the site is working on, captured on arrival.
_GLOBAL: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}


def site(client_id: int) -> str:
    return f"site-{client_id}"


def _client_id(fl_ctx: FLContext) -> int:
    return int(str(fl_ctx.get_identity_name()).rsplit("-", 1)[1])


def _round(shareable: Shareable) -> int:
    """gradleak's round (from 1) of a task: NVFlare counts rounds from 0."""
    return int(shareable.get_header(AppConstants.CURRENT_ROUND)) + 1


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in arrays.items()}


def _arrays(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


# -- the client side -------------------------------------------------------------------------------


class GradleakTrainer(Executor):  # type: ignore[misc]
    """The client's local training (``Simulator.train``): the global model in, its update out
    (a WEIGHT_DIFF DXO, the row's fields in its meta)."""

    def __init__(self, config_json: str, run_dir: str) -> None:
        super().__init__()
        self.config_json, self.run_dir = config_json, run_dir

    def execute(
        self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal
    ) -> Shareable:
        start = time.perf_counter()
        sim = client_simulator(self.config_json, self.run_dir)
        global_state = _tensors(from_shareable(shareable).data)
        update, loss = sim.train(
            _round(shareable), global_state, find_client(sim, _client_id(fl_ctx))
        )
        fields = with_meta(update, {"train_loss": loss, "seconds": time.perf_counter() - start})
        return DXO(
            DataKind.WEIGHT_DIFF, data=_arrays(update.delta), meta={ROW: json.dumps(fields)}
        ).to_shareable()


class GlobalModelCapture(DXOFilter):  # type: ignore[misc]
    """Task-data filter: keeps the global model a site receives, for the result filter's audit."""

    def __init__(self) -> None:
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS]
        )

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        _GLOBAL[str(fl_ctx.get_identity_name())] = (_round(shareable), _tensors(dxo.data))
        return dxo


class UpdateFilters(DXOFilter):  # type: ignore[misc]
    """Task-result filter: the experiment's update filters (defences, then the audit) on the
    update leaving the client. A withheld update leaves as an empty DXO carrying only its row; an
    exception withholds it too and is recorded (``filter_error``), never aborting the job."""

    def __init__(self, config_json: str, run_dir: str) -> None:
        super().__init__(
            supported_data_kinds=[DataKind.WEIGHT_DIFF], data_kinds_to_filter=[DataKind.WEIGHT_DIFF]
        )
        self.config_json, self.run_dir = config_json, run_dir

    def _config_json(self) -> str:
        return self.config_json

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO:
        start = time.perf_counter()
        fields = json.loads(dxo.meta[ROW])
        update = update_from(_tensors(dxo.data), fields)

        def locate() -> tuple[Simulator, int, dict[str, torch.Tensor], int]:
            sim = client_simulator(self._config_json(), self.run_dir)
            round, global_state = _GLOBAL[str(fl_ctx.get_identity_name())]
            return sim, round, global_state, _client_id(fl_ctx)

        update, withheld = filter_leaving(locate, update, fields, start)
        data = {} if withheld else _arrays(update.delta)
        return DXO(DataKind.WEIGHT_DIFF, data=data, meta={ROW: json.dumps(fields)})


# -- the server side -------------------------------------------------------------------------------


class GradleakController(ModelController):  # type: ignore[misc]
    """The server's workflow: gradleak's ``Simulator.run`` from where the run directory stands,
    its clients' rounds sent as NVFlare tasks, every result recorded through the run store. An
    error is written to ``error_file`` for the process that started the job."""

    def __init__(self, config_json: str, run_dir: str, error_file: str) -> None:
        super().__init__(persistor_id="")
        self.config_json, self.run_dir, self.error_file = config_json, run_dir, error_file

    def run(self) -> None:
        try:
            _serve(self)
        except BaseException as exc:  # handed to the starting process, which raises it
            Path(self.error_file).write_text(f"{type(exc).__name__}: {exc}")


def _serve(controller: GradleakController) -> None:
    from gradleak.experiments.config import ExperimentConfig
    from gradleak.experiments.scenario import build_scenario
    from gradleak.experiments.store import RunStore, StoreHooks
    from gradleak.rundir import OwnedDir

    config = ExperimentConfig.model_validate_json(controller.config_json)
    if config.engine.threads:
        torch.set_num_threads(config.engine.threads)
    scenario = build_scenario(config)
    store = RunStore(OwnedDir(Path(controller.run_dir), "run").join())
    reference = scenario.model.state_dict()
    last, done = store.resume_point(reference=reference)
    server = _ControllerSimulator(controller, **scenario.simulator_args(store.dir))
    server.run(
        store.load_checkpoint(last, reference),
        first_round=last + 1,
        last_round=config.training.rounds,
        hooks=StoreHooks(store, scenario.keep_every, None),
        done=done,
    )


class _ControllerSimulator(Simulator):
    """``Simulator`` inside the controller: a round's clients are NVFlare tasks."""

    def __init__(self, controller: GradleakController, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.controller = controller

    def run_clients(
        self, round: int, global_state: dict[str, torch.Tensor], clients: Sequence[ClientData]
    ) -> Iterator[ClientResult]:
        model = FLModel(
            params_type=ParamsType.FULL,
            params=_arrays(global_state),
            current_round=round - 1,
            total_rounds=None,
        )
        replies = self.controller.send_model_and_wait(
            TASK, data=model, targets=[site(c.client_id) for c in clients]
        )
        by_site = {r.meta.get("client_name"): r for r in replies}
        for c in clients:
            reply = by_site.get(site(c.client_id))
            if reply is None or ROW not in (reply.meta or {}):
                raise GradleakError(f"round {round}: client {c.client_id} sent no result")
            yield result_from(_tensors(reply.params or {}), json.loads(reply.meta[ROW]))


# -- the starting process --------------------------------------------------------------------------


def build_job(config_json: str, run_dir: str, client_ids: Sequence[int], error_file: str) -> FedJob:
    """The NVFlare job of an experiment: the controller on the server, on each client's site the
    trainer and the two filters."""
    job = FedJob(name="gradleak", min_clients=len(client_ids))
    job.to_server(GradleakController(config_json, run_dir, error_file))
    for cid in client_ids:
        job.to(GradleakTrainer(config_json, run_dir), site(cid), tasks=[TASK])
        job.to(GlobalModelCapture(), site(cid), tasks=[TASK], filter_type=FilterType.TASK_DATA)
        job.to(
            UpdateFilters(config_json, run_dir),
            site(cid),
            tasks=[TASK],
            filter_type=FilterType.TASK_RESULT,
        )
    return job


class NVFlareSimulator(Simulator):
    """``Simulator`` whose rounds run as an NVFlare job in NVFlare's simulator (SimEnv); the job's
    server process records into ``run_dir``, and ``run`` returns the final global model from it."""

    def __init__(self, *, config_json: str, run_dir: Path, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_json, self.run_dir = config_json, run_dir

    @classmethod
    def for_config(cls, config: Any, run_dir: Path, **kwargs: Any) -> NVFlareSimulator:
        return cls(config_json=client_config_json(config), run_dir=run_dir, **kwargs)

    def run(
        self, state: dict[str, torch.Tensor], *, first_round: int, last_round: int, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        from gradleak.experiments.store import RunStore

        workspace = Path(tempfile.mkdtemp(prefix="gradleak-nvflare-"))
        error = workspace / "error.txt"
        ids = [c.client_id for c in self.clients]
        _allow_gradleak(workspace / "gradleak")
        env = SimEnv(
            clients=[site(i) for i in ids],
            num_threads=len(ids),
            workspace_root=str(workspace),
            log_config=_quiet_console(workspace),
        )
        job = build_job(self.config_json, str(self.run_dir), ids, str(error))
        display = getattr(kwargs.get("hooks"), "display", None)  # the rows are recorded by the job
        follower = _Follower(self, display) if display is not None else None
        try:
            if follower:
                follower.start()
            env.deploy(job)
        except RuntimeError as exc:
            if not error.exists():
                raise GradleakError(f"the NVFlare job failed ({exc})") from None
        finally:
            if follower:
                follower.finish()
        if error.exists():
            raise GradleakError(f"the NVFlare job failed: {error.read_text()} (logs: {workspace})")
        store = RunStore(self.run_dir)
        rounds = store.rounds.read()
        if not rounds or rounds[-1]["round"] < last_round:
            raise GradleakError(
                f"the NVFlare job ended before round {last_round} (logs: {workspace})"
            )
        shutil.rmtree(workspace, ignore_errors=True)
        return store.load_checkpoint(last_round)


class _Follower(threading.Thread):
    """Shows the job's progress on the driver's display: NVFlare's server process records the
    rows into the run directory, and this thread reads them back as they appear (it records
    nothing)."""

    def __init__(self, sim: Simulator, display: Any, every: float = 0.5) -> None:
        from gradleak.experiments.store import RunStore

        super().__init__(daemon=True)
        self.sim, self.display, self.every = sim, display, every
        self.store = RunStore(sim.run_dir)  # type: ignore[attr-defined]
        self.halt = threading.Event()
        self.rows, self.rounds = len(self.store.results.read()), len(self.store.rounds.read())
        self.started = self.rounds  # the last round whose start was shown

    def run(self) -> None:
        while not self.halt.wait(self.every):
            self.step()

    def finish(self) -> None:
        self.halt.set()
        self.join()
        self.step()

    def step(self) -> None:
        try:  # rounds first: a round row read implies its result rows were written before it
            rounds, results = self.store.rounds.read(), self.store.results.read()
        except GradleakError:
            return
        events = sorted(
            [((r["round"], 0), r) for r in results[self.rows :]]
            + [((r["round"], 1), r) for r in rounds[self.rounds :]],
            key=lambda e: e[0],
        )
        self.rows, self.rounds = len(results), len(rounds)
        for (r, is_round), row in events:
            if r > self.started:
                self.display.round_started(r, self.sim.participants(r))
                self.started = r
            if is_round:
                fields = (
                    row[k] for k in ("round", "clients", "aggregated", "test_accuracy", "test_loss")
                )
                self.display.round_done(RoundResult(*fields), {})
            else:
                meta = UpdateMeta(
                    row["client"],
                    r,
                    row["num_samples"],
                    row["lr"],
                    row["epochs"],
                    row["steps"],
                    row["batch_size"],
                )
                self.display.client_done(ClientResult.from_row(row, ClientUpdate({}, meta)))


def _quiet_console(workspace: Path) -> str:
    """NVFlare's log configuration with only warnings on the console (its log files keep all)."""
    config = copy.deepcopy(default_log_dict)
    config["handlers"]["consoleHandler"]["level"] = "WARNING"
    path = workspace / "log_config.json"
    path.write_text(json.dumps(config))
    return str(path)


def _allow_gradleak(job_workspace: Path) -> None:
    """NVFlare builds only allow-listed component classes: NVFlare's defaults and this module's."""
    local = job_workspace / "local"
    local.mkdir(parents=True, exist_ok=True)
    resources = {"format_version": 2, "class_allow_list": [*DEFAULT_CLASS_ALLOW_LIST, __name__]}
    (local / "resources.json").write_text(json.dumps(resources, indent=2))


__all__ = [
    "GlobalModelCapture",
    "GradleakController",
    "GradleakTrainer",
    "NVFlareSimulator",
    "UpdateFilters",
    "build_job",
]
