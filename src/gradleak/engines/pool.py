"""The in-process engine with a pool of workers: the clients of a round (their training, defences
and audit: audits dominate the cost) run in parallel, the results are the sequential run's.

Each worker builds the experiment once from its config (``client_side.client_simulator``, as
the Flower engine's clients do) and runs ``Simulator.run_client``; the parent receives the
``ClientResult`` and records it in round order. The workers are Ray actors when Ray is installed
(``engine.pool: auto`` or ``ray``; a Ray instance already running is joined, else a local one is
started for the run), spawned processes otherwise (``processes``). Both pin torch's threads to
``engine.threads`` like the parent, and neither forks, so no OpenMP state crosses into them.
"""

from __future__ import annotations

import importlib.util
import logging
import multiprocessing as mp
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from gradleak.data.partition import ClientData
from gradleak.engines.client_side import client_simulator, find_client
from gradleak.experiments.engines import check_installed
from gradleak.fl.simulator import ClientResult, Simulator

_WORKER: dict[str, Any] = {}


def _start(config_json: str, run_dir: str) -> None:
    _WORKER["sim"] = client_simulator(config_json, run_dir)


def _work(round: int, state: dict[str, torch.Tensor], client_id: int) -> ClientResult:
    sim = _WORKER["sim"]
    return sim.run_client(round, state, find_client(sim, client_id))


class _Workers(Protocol):
    def map(
        self, round: int, state: dict[str, torch.Tensor], client_ids: Sequence[int]
    ) -> Iterator[ClientResult]:
        """The clients' results, in the order of ``client_ids``, as they are ready."""


class _Processes:
    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self.pool = pool

    def map(
        self, round: int, state: dict[str, torch.Tensor], client_ids: Sequence[int]
    ) -> Iterator[ClientResult]:
        futures = [self.pool.submit(_work, round, state, c) for c in client_ids]
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:
                f.cancel()


class _RayActor:
    """One Ray worker: the experiment built once, then one client's round per call."""

    def __init__(self, config_json: str, run_dir: str) -> None:
        _start(config_json, run_dir)

    def run(self, round: int, state: dict[str, torch.Tensor], client_id: int) -> ClientResult:
        return _work(round, state, client_id)


class _RayActors:
    def __init__(self, actors: list[Any]) -> None:
        from ray.util import ActorPool

        self.pool = ActorPool(actors)

    def map(
        self, round: int, state: dict[str, torch.Tensor], client_ids: Sequence[int]
    ) -> Iterator[ClientResult]:
        import ray

        ref = ray.put(state)  # one copy of the global model in Ray's object store, not one per task
        try:
            yield from self.pool.map(
                lambda actor, c: actor.run.remote(round, ref, c), list(client_ids)
            )
        except ray.exceptions.RayTaskError as exc:  # the worker's own exception, not Ray's wrapper
            raise exc.as_instanceof_cause() from None


def pool_kind(pool: str) -> str:
    """``processes`` or ``ray`` for the config's ``engine.pool`` (auto: Ray when installed)."""
    if pool == "ray":
        check_installed("ray", "engine.pool")
    return (
        "ray"
        if pool == "ray" or (pool == "auto" and importlib.util.find_spec("ray"))
        else "processes"
    )


@contextmanager
def _processes(workers: int, config_json: str, run_dir: str) -> Iterator[_Workers]:
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(
        workers, mp_context=ctx, initializer=_start, initargs=(config_json, run_dir)
    ) as pool:
        yield _Processes(pool)


@contextmanager
def _ray(workers: int, config_json: str, run_dir: str) -> Iterator[_Workers]:
    import ray

    own = not ray.is_initialized()
    if own:
        with warnings.catch_warnings():  # Ray's notices of its own future defaults
            warnings.simplefilter("ignore", FutureWarning)
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                logging_level=logging.WARNING,
                log_to_driver=False,
                configure_logging=False,
            )
    actor = ray.remote(num_cpus=1)(_RayActor)
    actors = [actor.remote(config_json, run_dir) for _ in range(workers)]
    try:
        yield _RayActors(actors)
    finally:
        for a in actors:
            ray.kill(a)
        if own:
            ray.shutdown()


class PoolSimulator(Simulator):
    """``Simulator`` whose clients of a round run in ``workers`` Ray actors or processes."""

    def __init__(
        self, *, config_json: str, run_dir: Path, workers: int, pool: str = "auto", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.config_json, self.run_dir, self.workers = config_json, run_dir, workers
        self.kind = pool_kind(pool)
        self._workers: _Workers | None = None

    @classmethod
    def for_config(cls, config: Any, run_dir: Path, **kwargs: Any) -> PoolSimulator:
        e = config.engine
        return cls(
            config_json=config.model_dump_json(),
            run_dir=run_dir,
            workers=e.workers,
            pool=e.pool,
            **kwargs,
        )

    def run(self, state: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        start = _ray if self.kind == "ray" else _processes
        with start(self.workers, self.config_json, str(self.run_dir)) as workers:
            self._workers = workers
            try:
                return super().run(state, **kwargs)
            finally:
                self._workers = None

    def run_clients(
        self, round: int, global_state: dict[str, torch.Tensor], clients: Sequence[ClientData]
    ) -> Iterator[ClientResult]:
        assert self._workers is not None, "run_clients runs inside run"
        return self._workers.map(round, global_state, [c.client_id for c in clients])
