"""Seconds and accuracy of the reconstruction-robustness bound (gradleak.defenses.rero).

Always the same cases: the Gaussian closed form (q = 1), and sampled mechanisms from one step to
5,000 (q from 0.001 to 0.9, kappa 0.01 to 0.5), each computed once with empty caches (seconds), and
compared with Balle et al.'s RDP bound and a seeded Monte Carlo of the optimal test (Hayes et al.'s
estimator; 200,000 draws, 20,000 past 500 steps: its standard error is reported). Writes JSON to
stdout and to --out (default benchmarks/results/rero.json).

    .venv/bin/python benchmarks/rero.py [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np

from gradleak.defenses import rero

ROOT = Path(__file__).resolve().parents[1]
# (noise multiplier, sample rate, steps, kappa)
CASES = [
    (1.0, 1.0, 10, 0.1),
    (4.0, 1.0, 1000, 0.1),
    (0.3, 0.01, 1, 0.1),
    (1.0, 0.5, 1, 0.5),
    (2.0, 0.2, 50, 0.1),
    (0.8, 0.1, 100, 0.1),
    (1.0, 0.01, 1000, 0.1),
    (1.0, 0.001, 5000, 0.1),
    (1.5, 0.05, 3000, 0.01),
    (0.5, 0.01, 3000, 0.1),
    (5.0, 0.9, 1000, 0.1),
]


def monte_carlo(
    z: float, q: float, t: int, k: float, n: int, batches: int = 8
) -> tuple[float, float]:
    """Hayes et al.'s estimator of the optimal test's power, in batches: (mean, standard error)."""
    rng = np.random.default_rng(0)
    estimates = []
    for _ in range(batches):
        loss = np.zeros(n // batches)
        for _ in range(t):
            x = rng.standard_normal(loss.size) * z
            loss += np.log1p(q * np.expm1((2 * x - 1) / (2 * z * z)))
        ratio = np.exp(np.sort(loss))
        estimates.append(1 - (1 - k) * ratio[: int(ratio.size * (1 - k))].mean())
    return float(np.mean(estimates)), float(np.std(estimates, ddof=1) / math.sqrt(batches))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/rero.json")
    args = parser.parse_args()
    rows = []
    for z, q, t, k in CASES:
        rero._sampled.cache_clear()
        rero._rdp_step.cache_clear()
        start = time.perf_counter()
        bound = rero.rero_bound(z, q, t, k)
        seconds = time.perf_counter() - start
        mc, se = monte_carlo(z, q, t, k, 20_000 if t > 500 else 200_000)
        rows.append(
            {
                "noise_multiplier": z,
                "sample_rate": q,
                "steps": t,
                "kappa": k,
                "bound": bound,
                "seconds": seconds,
                "rdp_bound": rero.rdp_rero_bound(z, q, t, k),
                "monte_carlo": mc,
                "monte_carlo_se": se,
                "bound_over_monte_carlo": bound / mc,
            }
        )
    out = {"machine": platform.machine(), "python": platform.python_version(), "cases": rows}
    text = json.dumps(out, indent=2)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
