"""The command-line driver shared by the benchmark scripts: named cases, JSON per case."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "results"


def run_cases(cases: dict[str, Callable[[], dict]], prefix: str, doc: str) -> None:
    """Run the cases named on the command line (or ``all``); write ``results/PREFIX_CASE.json``."""
    names = sys.argv[1:] or ["--help"]
    if names == ["all"]:
        names = list(cases)
    if any(n not in cases for n in names):
        print(doc)
        raise SystemExit(0 if names == ["--help"] else 2)
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names:
        t = time.perf_counter()
        result = {
            "case": name,
            **cases[name](),
            "wall_seconds": time.perf_counter() - t,
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
        }
        text = json.dumps(result, indent=2)
        (OUT / f"{prefix}_{name}.json").write_text(text + "\n")
        print(text)
