"""Engine start-up and round time: the same small federation in-process, on Flower and on NVFlare;
JSON output.

    .venv/bin/python benchmarks/engines.py CASE [CASE ...]     (or: all)

Cases:
  startup   digits 8 x 8, an MLP (hidden 32), 3 clients, 5 rounds, no audit, torch threads 1:
            seconds from the start to the end of round 1, and per round after it, per engine
  audits    configs/demo.yaml with clients 1 and 2 audited every round (6 rounds, 2,000 attack
            iterations), torch threads 1:
            seconds sequentially, with 2 worker processes and with 2 Ray actors (engine.workers 2,
            engine.pool processes | ray), and whether the results are the same
Results go to benchmarks/results/engines_CASE.json and stdout.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

from cases import run_cases
from gradleak.experiments import run_experiment
from gradleak.experiments.config import validate_config

CONFIG = {
    "name": "engines",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {
        "scheme": "explicit",
        "clients": [
            {"size": 1, "batch_size": 1},
            {"size": 20, "batch_size": 4},
            {"size": 30, "batch_size": 8},
        ],
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "training": {"rounds": 5, "lr": 0.1, "momentum": 0.5},
}


class _Clock:
    """Display hooks that stamp the end of every round."""

    def __init__(self) -> None:
        self.start, self.ends = time.perf_counter(), []

    def round_started(self, round, clients) -> None:  # noqa: ANN001
        pass

    def client_done(self, result) -> None:  # noqa: ANN001
        pass

    def round_done(self, result, state) -> None:  # noqa: ANN001
        self.ends.append(time.perf_counter())


def _timed(engine: str) -> dict:
    clock = _Clock()
    with tempfile.TemporaryDirectory() as tmp:
        config = validate_config({**CONFIG, "engine": {"name": engine, "threads": 1}})
        run_experiment(config, Path(tmp) / "run", display=clock)
    total = time.perf_counter() - clock.start
    per_round = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    return {
        "seconds_to_first_round_end": clock.ends[0] - clock.start,
        "seconds_per_round_after": sum(per_round) / len(per_round),
        "total_seconds": total,
    }


def case_startup() -> dict:
    out = {
        "setup": "3 clients, MLP on digits 8 x 8, 5 rounds, no audit, torch threads 1",
        "inprocess": _timed("inprocess"),
    }
    if importlib.util.find_spec("flwr") is not None:
        out["flower"] = _timed("flower")
    if importlib.util.find_spec("nvflare") is not None:
        out["nvflare"] = _timed_by_totals("nvflare")
    return out


def _timed_by_totals(engine: str) -> dict:
    """For an engine whose rounds are recorded in another process (NVFlare's server), where no
    display hook fires here: a 1-round and a 5-round run, start-up = the first, per round = the
    difference / 4."""
    totals = {}
    for rounds in (1, 5):
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            config = validate_config(
                {
                    **CONFIG,
                    "training": {**CONFIG["training"], "rounds": rounds},
                    "engine": {"name": engine, "threads": 1},
                }
            )
            run_experiment(config, Path(tmp) / "run")
        totals[rounds] = time.perf_counter() - start
    return {
        "seconds_to_first_round_end": totals[1],
        "seconds_per_round_after": (totals[5] - totals[1]) / 4,
        "total_seconds": totals[5],
        "note": "from the totals of a 1-round and a 5-round run",
    }


def case_audits() -> dict:
    import json

    from gradleak.experiments.config import load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").resolved()
    base["training"]["rounds"] = 6
    base["audit"]["frequency"] = 1
    base["audit"]["attack"]["iterations"] = 2000
    out: dict = {
        "setup": "configs/demo.yaml, 6 rounds, clients 1 and 2 audited every round at 2,000 "
        "iterations, torch threads 1"
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, workers, pool in (
            ("sequential", None, "auto"),
            ("workers_2", 2, "processes"),
            ("ray_actors_2", 2, "ray"),
        ):
            config = validate_config(
                {**base, "engine": {"threads": 1, "workers": workers, "pool": pool}}
            )
            start = time.perf_counter()
            run_experiment(config, Path(tmp) / label)
            out[f"{label}_seconds"] = time.perf_counter() - start
            lines = (Path(tmp) / label / "results.jsonl").read_text().splitlines()
            rows[label] = [
                {k: v for k, v in json.loads(x).items() if k != "attack_seconds"} for x in lines
            ]
    for label in ("workers_2", "ray_actors_2"):
        out[f"{label}_speedup"] = out["sequential_seconds"] / out[f"{label}_seconds"]
        out[f"{label}_same_results"] = rows["sequential"] == rows[label]
    return out


CASES = {"startup": case_startup, "audits": case_audits}


def main() -> None:
    run_cases(CASES, "engines", __doc__)


if __name__ == "__main__":
    main()
