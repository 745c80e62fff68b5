"""Seconds per round and peak memory of the nine-client federation (configs/paper-9-clients.yaml).

Always the same case: the shipped config's federation (data, clients, training) with a batch-norm
ResNet-18 at a quarter width on 32 x 32 images, CPU, rounds 1..N (default 2) from the seeded
initial model, without the audit. Writes JSON to stdout and to --out (default
benchmarks/results/round_time.json).

    .venv/bin/python benchmarks/round_time.py [--rounds 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from gradleak.experiments import build_scenario, load_config

ROOT = Path(__file__).resolve().parents[1]
CASE = [
    "device=cpu",
    "model.name=resnet18",
    "model.kwargs={width: 16}",
    "data.image_size=32",
    "audit=null",
    "defenses=[]",
]


class _Clock:
    """Simulator hooks that time each round and each client."""

    def __init__(self) -> None:
        self.rounds: list[float] = []
        self.clients: list[dict] = []
        self._t = 0.0

    def round_started(self, round, clients) -> None:  # noqa: ANN001
        self._t = time.perf_counter()

    def client_done(self, result) -> None:  # noqa: ANN001
        m = result.update.meta
        self.clients.append({"round": m.round, "client": m.client_id, "seconds": result.seconds})

    def round_done(self, result, state) -> None:  # noqa: ANN001
        self.rounds.append(time.perf_counter() - self._t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/round_time.json")
    args = parser.parse_args()

    config = load_config(ROOT / "configs/paper-9-clients.yaml", CASE)
    t0 = time.perf_counter()
    scenario = build_scenario(config)
    setup = time.perf_counter() - t0
    clock = _Clock()
    scenario.simulator().run(
        scenario.initial_state(), first_round=1, last_round=args.rounds, hooks=clock
    )
    result = {
        "benchmark": "round_time",
        "case": "configs/paper-9-clients.yaml with " + ", ".join(CASE),
        "model": f"{config.model.name} {config.model.kwargs}",
        "image_size": config.data.image_size,
        "clients": len(scenario.clients),
        "training_images": sum(len(c.data) for c in scenario.clients),
        "rounds_timed": args.rounds,
        "seconds_per_round": sum(clock.rounds) / len(clock.rounds),
        "seconds_per_round_each": clock.rounds,
        "seconds_setup": setup,
        "seconds_per_client": clock.clients,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }
    text = json.dumps(result, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
