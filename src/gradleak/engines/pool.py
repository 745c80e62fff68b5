"""The in-process engine with a pool of worker processes: the clients of a round (their training,
defences and audit: audits dominate the cost) run in parallel, the results are the sequential run's.

Each worker builds the experiment once from its config (``client_side.client_simulator``, as
the Flower engine's clients do) and runs ``Simulator.run_client``; the parent receives the
``ClientResult`` and records it in round order. Workers are spawned (not forked), so no OpenMP
state crosses into them, and pin torch's threads to ``engine.threads`` like the parent.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from gradleak.data.partition import ClientData
from gradleak.engines.client_side import client_simulator, find_client
from gradleak.fl.simulator import ClientResult, Simulator

_WORKER: dict[str, Any] = {}


def _start(config_json: str, run_dir: str) -> None:
    _WORKER["sim"] = client_simulator(config_json, run_dir)


def _work(round: int, state: dict[str, torch.Tensor], client_id: int) -> ClientResult:
    sim = _WORKER["sim"]
    return sim.run_client(round, state, find_client(sim, client_id))


class PoolSimulator(Simulator):
    """``Simulator`` whose clients of a round run in ``workers`` processes."""

    def __init__(self, *, config_json: str, run_dir: Path, workers: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config_json, self.run_dir, self.workers = config_json, run_dir, workers
        self._pool: ProcessPoolExecutor | None = None

    def run(self, state: dict[str, torch.Tensor], **kwargs: Any) -> dict[str, torch.Tensor]:
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_start,
                                 initargs=(self.config_json, str(self.run_dir))) as pool:  # fmt: skip
            self._pool = pool
            try:
                return super().run(state, **kwargs)
            finally:
                self._pool = None

    def run_clients(
        self, round: int, global_state: dict[str, torch.Tensor], clients: Sequence[ClientData]
    ) -> Iterator[ClientResult]:
        assert self._pool is not None, "run_clients runs inside run"
        futures = [self._pool.submit(_work, round, global_state, c.client_id) for c in clients]
        try:
            for f in futures:
                yield f.result()
        finally:
            for f in futures:
                f.cancel()
