"""Running one experiment into a run directory, resumable after any interruption."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from gradleak.audit.filter import LeakageAudit
from gradleak.data.dataset import DataBundle
from gradleak.data.partition import ClientData
from gradleak.engines import check_config as check_engine
from gradleak.errors import ConfigError, GradleakError
from gradleak.experiments.config import ExperimentConfig
from gradleak.experiments.secure_sum import check_config as check_secure_sum
from gradleak.experiments.secure_sum import run_disaggregation
from gradleak.experiments.store import RunStore
from gradleak.fl.client import LocalTraining
from gradleak.fl.filters import UpdateFilter
from gradleak.fl.server import STRATEGIES, Strategy
from gradleak.fl.simulator import ClientResult, Hooks, RoundResult, Simulator
from gradleak.models import build_model
from gradleak.rundir import OwnedDir, SubDir
from gradleak.seeding import derive_seed

log = logging.getLogger("gradleak")


@dataclass
class Scenario:
    """Everything an experiment is made of, built (and checked) before any training."""

    config: ExperimentConfig
    data: DataBundle
    clients: list[ClientData]
    model: nn.Module
    strategy: Strategy
    device: torch.device

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def filters(self, run: OwnedDir | None = None) -> list[UpdateFilter]:
        """The client-side filters in order: the defences, then the audit (which therefore
        attacks exactly what the server receives; its images go to ``RUN/audit``)."""
        cfg = self.config
        rate = cfg.training.clients_per_round
        out: list[UpdateFilter] = [d.build(index=i, sample_rate=rate) for i, d in enumerate(cfg.defenses)]
        audit = self.audit(run.sub("audit") if run else None)
        return out if audit is None else [*out, audit]

    def audit(self, out_dir: SubDir | None) -> LeakageAudit | None:
        """The configured audit (None without an ``audit:`` section), saving images in ``out_dir``."""
        cfg = self.config
        if cfg.audit is None:
            return None
        prior = self.data.test.images.mean(0, keepdim=True) if cfg.audit.prior == "mean-image" else None
        return LeakageAudit(
            cfg.audit, model=self.model, image_shape=self.data.shape,
            num_classes=self.data.num_classes, mean=self.data.mean, std=self.data.std,
            prior=prior, out_dir=out_dir, defenses=cfg.defense_summary(), device=self.device,
        )  # fmt: skip

    @property
    def keep_every(self) -> int:
        """Checkpoint spacing: every round when a disaggregation chain needs each round's model."""
        d = self.config.disaggregation
        return 1 if d is not None and d.invert else self.config.checkpoints.keep_every

    def simulator_args(self, run: OwnedDir | None = None) -> dict[str, Any]:
        """The ``Simulator`` arguments of this experiment (what every engine's loop is built from)."""
        t = self.config.training
        return dict(
            model=self.model, clients=self.clients, test=self.data.test,
            mean=self.data.mean, std=self.data.std, strategy=self.strategy,
            training=LocalTraining(t.local_epochs, t.lr, t.momentum, t.weight_decay, t.batch_norm),
            seed=self.config.seed, clients_per_round=t.clients_per_round, device=self.device,
            filters=self.filters(run),
        )  # fmt: skip

    def simulator(self, run: OwnedDir | None = None, engine: str | None = None) -> Simulator:
        """The federation's loop on ``engine`` (default: the config's ``engine.name``; ``local``:
        this process only, whatever the config says, as an engine's client processes need)."""
        e = self.config.engine
        kwargs = self.simulator_args(run)
        engine = engine or e.name
        if engine == "local" or (engine == "inprocess" and (e.workers or 1) == 1):
            return Simulator(**kwargs)
        if run is None:
            raise GradleakError(f"the {engine} engine needs a run directory")
        run_dir = run.root
        config_json = self.config.model_dump_json()
        if engine == "flower":
            from gradleak.engines.flower import FlowerSimulator

            secure = self.config.aggregation.strategy == "secure-sum"
            return FlowerSimulator(config_json=config_json, run_dir=run_dir, cpus_per_client=e.cpus_per_client,
                                   secagg=e.secagg if secure else None, **kwargs)  # fmt: skip
        if engine == "nvflare":
            from gradleak.engines.nvflare import NVFlareSimulator

            return NVFlareSimulator(config_json=config_json, run_dir=run_dir, **kwargs)
        from gradleak.engines.pool import PoolSimulator

        return PoolSimulator(config_json=config_json, run_dir=run_dir, workers=e.workers, pool=e.pool, **kwargs)


def resolve_device(name: str) -> torch.device:
    """auto (a GPU when there is one), cpu, cuda or cuda:N."""
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ConfigError("device", f"{name!r} is not one of auto, cpu, cuda, cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was asked for but no GPU is available")
    return torch.device(name)


def build_scenario(config: ExperimentConfig) -> Scenario:
    """Load the data, split the clients and build the model; fails early on impossible setups."""
    check_secure_sum(config)
    data = config.data.load(config.seed)
    config.partition.check(len(data.train))
    clients = config.partition.split(data.train, config.seed)
    check_engine(config, len(clients))
    torch.manual_seed(derive_seed(config.seed, "model"))
    c, h, _ = data.shape
    model = build_model(
        config.model.name, channels=c, image_size=h, num_classes=data.num_classes,
        kwargs=config.model.kwargs,
    )  # fmt: skip
    strategy = STRATEGIES.get(config.aggregation.strategy, key="aggregation.strategy")()
    return Scenario(config, data, clients, model, strategy, resolve_device(config.device))


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The first dotted key where two config trees differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            d = first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            d = first_difference(x, y, f"{prefix}{i}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


class StoreHooks:
    """Records every client and round in the run store (and passes them on to a display)."""

    def __init__(self, store: RunStore, keep_every: int, display: Hooks | None) -> None:
        self.store, self.keep_every, self.display = store, keep_every, display

    def round_started(self, round: int, clients: Sequence[ClientData]) -> None:
        if self.display:
            self.display.round_started(round, clients)

    def client_done(self, result: ClientResult) -> None:
        self.store.record_client(result)
        m = result.update.meta
        log.debug("round %d client %d: loss %.4f", m.round, m.client_id, result.train_loss)
        if self.display:
            self.display.client_done(result)

    def round_done(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None:
        self.store.record_round(result.row(), state, self.keep_every, result.observed)
        log.info(
            "round %d: test accuracy %.4f, loss %.4f (%d/%d updates aggregated)",
            result.round, result.test_accuracy, result.test_loss, result.aggregated,
            len(result.clients),
        )  # fmt: skip
        if self.display:
            self.display.round_done(result, state)


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
        self.store.dir.check_claimable()  # the directory can become this run's: nothing is written yet
        self.resume = resume
        self._check()
        self.scenario = build_scenario(config)
        self.first_round = len(self.store.rounds.read()) + 1 if self.store.exists() else 1

    def _check(self) -> None:
        """Refuse a fresh run on a directory that holds one, and a resume with another config."""
        if self.store.exists() and not self.resume:
            raise GradleakError(
                f"{self.run_dir} already holds a run: pass --resume to continue it, or choose another --out"
            )
        if self.store.exists():
            diff = first_difference(self.store.read_config(), self.resolved)
            if diff:
                raise ConfigError(diff, f"differs from the config of the run being resumed in {self.run_dir}")



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
                last, done = store.resume_point(partial=not simulator.atomic_rounds, reference=reference)
                state = store.load_checkpoint(last, reference)
                log.info("resuming %s after round %d (%d clients of round %d done)", config.name,
                         last, len(done), last + 1)  # fmt: skip
            if last < config.training.rounds:
                simulator.run(
                    state, first_round=last + 1, last_round=config.training.rounds,
                    hooks=StoreHooks(store, self.scenario.keep_every, display), done=done,
                )  # fmt: skip
            if config.disaggregation is not None:
                run_disaggregation(self.scenario, store, self.scenario.audit(store.dir.sub("disaggregation")))
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
