"""The engines by name, and the checks of their settings made before any training.

The adapters (package ``gradleak.engines``) run gradleak's federation on existing engines instead
of the in-process loop.

Each adapter replaces only ``Simulator.run_clients`` (who computes a client's round, and where)
and, under secure aggregation, ``Simulator.observe`` (the round sum the engine's protocol
reveals): participant draws, local training, the update filters, aggregation, evaluation and the
run store are gradleak's own, so a run gives the same results on every engine.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

from gradleak.errors import ConfigError

# Engines by name: the module and class of each, imported only when a run uses it (flwr, ray and
# nvflare are optional and slow to import). Each class offers ``for_config(config, run_dir,
# **kwargs)``.
ENGINES = {
    "pool": "gradleak.engines.pool:PoolSimulator",
    "flower": "gradleak.engines.flower:FlowerSimulator",
    "nvflare": "gradleak.engines.nvflare:NVFlareSimulator",
}


def engine_class(name: str) -> Any:
    """The simulator class of the engine ``name`` (imported now)."""
    if name not in ENGINES:
        raise ConfigError(
            "engine.name", f"unknown engine {name!r} (known: {', '.join(sorted(ENGINES))})"
        )
    module, _, attr = ENGINES[name].partition(":")
    return getattr(importlib.import_module(module), attr)


EXTRAS = {"flower": ("flwr", "ray"), "nvflare": ("nvflare",), "ray": ("ray",)}

# SecAgg+ masks live modulo 2^32 (Flower's default and largest modulus).
SECAGG_MODULUS = 2**32


def check_config(config: Any, num_clients: int) -> None:
    """Refuse, before any training, an engine setting that cannot run with ``num_clients``."""
    engine = config.engine.name
    for i, defense in enumerate(config.defenses):
        problem = defense.engine_problem(engine)
        if problem is not None:
            raise ConfigError(f"defenses.{i}", f"{defense.name}: {problem}")
    if engine == "inprocess":
        if (config.engine.workers or 1) > 1 and config.engine.pool == "ray":
            check_installed("ray", "engine.pool")
        return
    check_installed(engine)
    if config.aggregation.strategy == "secure-sum":
        if engine == "nvflare":
            raise ConfigError(
                "aggregation.strategy",
                "secure-sum is not available on nvflare (gradleak drives "
                "no secure-aggregation protocol there): use engine.name flower or inprocess",
            )
        check_secagg(config, num_clients)


def check_secagg(config: Any, num_clients: int) -> None:
    """SecAgg+ needs two participants a round, and a quantised sum that fits its modulus."""
    from gradleak.fl.simulator import participant_count

    n = participant_count(config.training.clients_per_round, num_clients)
    if n < 2:
        raise ConfigError(
            "training.clients_per_round",
            f"SecAgg+ needs at least 2 participants a round; this draws {n} of {num_clients}",
        )
    q = config.engine.secagg.quantization
    if n * q >= SECAGG_MODULUS:
        raise ConfigError(
            "engine.secagg.quantization",
            f"{n} participants x {q} levels overflow SecAgg+'s modulus 2^32: "
            f"use at most {(SECAGG_MODULUS - 1) // n} levels",
        )


def check_installed(engine: str, key: str = "engine.name") -> None:
    """Refuse an engine whose optional extra is not installed, naming the pip command."""
    missing = [m for m in EXTRAS.get(engine, ()) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(
            key,
            f"{engine} needs {', '.join(missing)}: pip install -c constraints.txt "
            f"'gradleak[{engine}]'",
        )
