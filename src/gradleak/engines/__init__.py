"""Adapters that run gradleak's federation on existing engines instead of the in-process loop.

Each adapter replaces only ``Simulator.run_clients`` (who computes a client's round, and where):
participant draws, local training, the update filters, aggregation, evaluation and the run store
are gradleak's own, so a run gives the same results on every engine.
"""

from __future__ import annotations

import importlib.util
from typing import Any

from gradleak.errors import ConfigError

EXTRAS = {"flower": ("flwr", "ray")}


def check_config(config: Any) -> None:
    """Refuse, before any training, an engine setting that cannot run."""
    engine = config.engine.name
    if engine == "inprocess":
        return
    if config.aggregation.strategy == "secure-sum":
        raise ConfigError("aggregation.strategy", f"secure-sum is not available on the {engine} engine yet "
                          "(its SecAgg+ protocol is not driven by gradleak): use engine.name: inprocess")  # fmt: skip
    check_installed(engine)


def check_installed(engine: str) -> None:
    """Refuse an engine whose optional extra is not installed, naming the pip command."""
    missing = [m for m in EXTRAS.get(engine, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            "engine.name",
            f"{engine} needs {', '.join(missing)}: pip install -c constraints.txt 'gradleak[{engine}]'",
        )
