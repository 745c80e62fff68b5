"""What an experiment is made of: the data, the clients, the model, the task, the strategy and the
update filters, built (and checked) from a config before any training; and the federation's loop
on the configured engine. Engines and worker processes build their side from here too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gradleak.audit.filter import LeakageAudit
from gradleak.data.dataset import DataBundle
from gradleak.data.partition import ClientData
from gradleak.errors import ConfigError, GradleakError
from gradleak.experiments.config import ExperimentConfig
from gradleak.experiments.engines import check_config as check_engine
from gradleak.experiments.engines import engine_class
from gradleak.experiments.secure_sum import check_config as check_secure_sum
from gradleak.fl.client import LocalTraining
from gradleak.fl.filters import UpdateFilter
from gradleak.fl.server import STRATEGIES, Strategy
from gradleak.fl.simulator import Simulator
from gradleak.modality import TASKS, Task
from gradleak.models import build_model
from gradleak.rundir import OwnedDir, SubDir
from gradleak.seeding import derive_seed


@dataclass
class Scenario:
    """Everything an experiment is made of, built (and checked) before any training."""

    config: ExperimentConfig
    data: DataBundle
    clients: list[ClientData]
    model: nn.Module
    task: Task
    strategy: Strategy
    device: torch.device

    def initial_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def filters(self, run: OwnedDir | None = None) -> list[UpdateFilter]:
        """The client-side filters in order: the defences, then the audit (which therefore
        attacks exactly what the server receives; its images go to ``RUN/audit``)."""
        cfg = self.config
        rate = cfg.training.clients_per_round
        out: list[UpdateFilter] = [
            d.build(index=i, sample_rate=rate) for i, d in enumerate(cfg.defenses)
        ]
        audit = self.audit(run.sub("audit") if run else None)
        return out if audit is None else [*out, audit]

    def audit(self, out_dir: SubDir | None) -> LeakageAudit | None:
        """The configured audit (None without an ``audit:`` section), saving examples in
        ``out_dir``;
        its prior (what the server guesses without the update) comes from the public test split."""
        cfg = self.config
        if cfg.audit is None:
            return None
        spec = self.data.spec
        return LeakageAudit(
            cfg.audit,
            model=self.model,
            spec=spec,
            num_classes=self.data.num_classes,
            prior=spec.prior(cfg.audit.prior, self.data.test),
            out_dir=out_dir,
            defenses=cfg.defense_summary(),
            device=self.device,
            secure_aggregation=cfg.aggregation.strategy == "secure-sum",
        )

    @property
    def keep_every(self) -> int:
        """Checkpoint spacing: every round when a disaggregation chain needs each round's model."""
        d = self.config.disaggregation
        return 1 if d is not None and d.invert else self.config.checkpoints.keep_every

    def simulator_args(self, run: OwnedDir | None = None) -> dict[str, Any]:
        """The ``Simulator`` arguments of this experiment (what every engine's loop is built
        from)."""
        t = self.config.training
        return dict(
            model=self.model,
            clients=self.clients,
            test=self.data.test,
            spec=self.data.spec,
            task=self.task,
            strategy=self.strategy,
            training=LocalTraining(t.local_epochs, t.lr, t.momentum, t.weight_decay, t.batch_norm),
            seed=self.config.seed,
            clients_per_round=t.clients_per_round,
            device=self.device,
            filters=self.filters(run),
            recalibrate_bn=self.config.aggregation.recalibrate_bn,
        )

    def simulator(self, run: OwnedDir | None = None, engine: str | None = None) -> Simulator:
        """The federation's loop on ``engine`` (default: the config's ``engine.name``, with a pool
        of
        workers when ``engine.workers`` > 1; ``local``: this process only, whatever the config says,
        as an engine's client processes need)."""
        e = self.config.engine
        kwargs = self.simulator_args(run)
        engine = engine or ("pool" if e.name == "inprocess" and (e.workers or 1) > 1 else e.name)
        if engine in ("local", "inprocess"):
            return Simulator(**kwargs)
        if run is None:
            raise GradleakError(f"the {engine} engine needs a run directory")
        return engine_class(engine).for_config(self.config, run.root, **kwargs)


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
    if config.audit is not None and config.audit.metric not in data.spec.metrics:
        raise ConfigError(
            "audit.metric",
            f"{config.audit.metric!r} is not a metric of {data.spec.kind} data "
            f"(one of {', '.join(data.spec.metrics)})",
        )
    config.partition.check(len(data.train))
    clients = config.partition.split(data.train, config.seed)
    check_engine(config, len(clients))
    task = TASKS.get(data.task, key="data")()
    torch.manual_seed(derive_seed(config.seed, "model"))
    model = build_model(
        config.model.name,
        spec=data.spec,
        num_classes=data.num_classes,
        kwargs=config.model.kwargs,
        task=task,
    )
    strategy = STRATEGIES.get(config.aggregation.strategy, key="aggregation.strategy")()
    return Scenario(config, data, clients, model, task, strategy, resolve_device(config.device))
