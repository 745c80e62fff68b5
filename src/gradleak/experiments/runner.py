"""Running one experiment into a run directory, resumable after any interruption."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gradleak.errors import ConfigError, DataError, GradleakError
from gradleak.experiments.config import ExperimentConfig, first_difference
from gradleak.experiments.scenario import build_scenario
from gradleak.experiments.secure_sum import run_disaggregation
from gradleak.experiments.store import RunStore, StoreHooks
from gradleak.fl.simulator import Hooks
from gradleak.rundir import OwnedDir

log = logging.getLogger("gradleak")


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Torch's thread count pinned to ``n`` for the block (None: left as it is)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Whether two state dicts hold the same tensors, bit for bit."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@contextmanager
def _log_to(owner: OwnedDir, rel: str) -> Iterator[None]:
    """The log also written to ``rel`` of the run directory (appended, never through a link)."""
    with owner.appending(rel) as f:
        handler = logging.StreamHandler(io.TextIOWrapper(f, write_through=True))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(handler)
        if log.level == logging.NOTSET or log.level > logging.INFO:
            log.setLevel(logging.INFO)
        try:
            yield
        finally:
            log.removeHandler(handler)
            handler.flush()


class Run:
    """An experiment paired with its run directory. Every check happens on construction, so a
    bad config, missing data or a clashing directory fails before anything is written."""

    def __init__(self, config: ExperimentConfig, run_dir: Path, *, resume: bool = False) -> None:
        self.config, self.run_dir = config, run_dir
        self.store = RunStore(run_dir)
        self.resolved = config.resolved()
        # the directory can become this run's (nothing is written yet)
        self.store.dir.check_claimable()
        self.resume = resume
        self._check()
        self.scenario = build_scenario(config)
        self.first_round = len(self.store.rounds.read()) + 1 if self.store.exists() else 1

    def _check(self) -> None:
        """Refuse a fresh run on a directory that holds one, and a resume with another config."""
        if self.store.exists() and not self.resume:
            raise GradleakError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, or choose "
                "another --out"
            )
        if self.store.exists():
            diff = first_difference(self.store.read_config(), self.resolved)
            if diff:
                raise ConfigError(
                    diff, f"differs from the config of the run being resumed in {self.run_dir}"
                )

    def execute(self, display: Hooks | None = None) -> list[dict[str, Any]]:
        """Run (or continue) the experiment; return its round rows. The directory is this
        process's while it runs (a second process is refused), and the checks are made again under
        that lock, since another process may have started a run there since construction."""
        self.store.claim()
        lock = self.store.lock()
        try:
            self._check()
            return self._execute(display)
        finally:
            RunStore.unlock(lock)

    def _execute(self, display: Hooks | None) -> list[dict[str, Any]]:
        config, store = self.config, self.store
        # A start killed between the config and checkpoint 0 is finished as a fresh start (the
        # initial model is a function of the config alone).
        fresh = not store.exists() or (not store.rounds.read() and not store.has_checkpoint(0))
        store.write_config(self.resolved)
        with _log_to(store.dir, "run.log"), _threads(config.engine.threads):
            simulator = self.scenario.simulator(store.dir)
            if fresh:
                store.clean(0)
                state, last, done = self.scenario.initial_state(), 0, {}
                store.save_checkpoint(0, state)
                log.info("started %s in %s", config.name, self.run_dir)
            else:
                reference = self.scenario.model.state_dict()
                last, done = store.resume_point(
                    partial=not simulator.atomic_rounds, reference=reference
                )
                state = store.load_checkpoint(last, reference)
                if last == 0 and not _same_state(state, self.scenario.initial_state()):
                    raise DataError(
                        f"{store.checkpoint_path(0)} is not the initial model this config "
                        "builds; the run directory is damaged"
                    )
                log.info(
                    "resuming %s after round %d (%d clients of round %d done)",
                    config.name,
                    last,
                    len(done),
                    last + 1,
                )
            if last < config.training.rounds:
                simulator.run(
                    state,
                    first_round=last + 1,
                    last_round=config.training.rounds,
                    hooks=StoreHooks(store, self.scenario.keep_every, display),
                    done=done,
                )
            if config.disaggregation is not None:
                run_disaggregation(
                    self.scenario, store, self.scenario.audit(store.dir.sub("disaggregation"))
                )
            log.info("finished %s", config.name)
        return store.rounds.read()


def run_experiment(
    config: ExperimentConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    display: Hooks | None = None,
) -> list[dict[str, Any]]:
    """Run (or continue) an experiment in ``run_dir``; return its round rows.

    Without ``resume`` the directory must not hold a run yet. With it, the stored config must
    equal ``config`` and the run continues after its last finished round, reusing the finished
    clients of the interrupted round.
    """
    return Run(config, run_dir, resume=resume).execute(display)
