"""Experiments: the config schema, the runner and the results store."""

from gradleak.experiments.config import ExperimentConfig, load_config
from gradleak.experiments.runner import Run, run_experiment
from gradleak.experiments.scenario import Scenario, build_scenario
from gradleak.experiments.store import RunStore

__all__ = [
    "ExperimentConfig",
    "Run",
    "RunStore",
    "Scenario",
    "build_scenario",
    "load_config",
    "run_experiment",
]
