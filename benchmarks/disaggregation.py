"""Gradient disaggregation: exactness and time, on fixed synthetic and FedAvg cases; JSON output.

    .venv/bin/python benchmarks/disaggregation.py CASE [CASE ...]     (or: all)

Cases (participation Bernoulli(rate) per client and round, seed 0, windows of 10 rounds):
  reference   20 clients/200 rounds/200 dims; 50/200/200 at rate 0.5; 100/400/400
  scale       clients 20, 50, 100, 200, 500, 1000 with rounds = 2 x clients, 200 dims (stops after
              the first size that takes over 5 minutes)
  noise       20/200/200 with Gaussian noise of std 0.05, 0.1, 0.2 added to the sums
  fedavg      20 clients, 200 rounds: real FedAvg updates of an MLP on digits that trains between
              rounds (each round's sum is of updates from the current global model)
Results go to benchmarks/results/disaggregation_CASE.json and stdout.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import torch
from cases import run_cases

from gradleak.attacks.disaggregation import disaggregate, window_counts

WINDOW = 10


def _run(p: np.ndarray, sums: np.ndarray, u: np.ndarray | None = None) -> dict:
    r = disaggregate(sums, window_counts(p, WINDOW), WINDOW, time_limit=600)
    out = {"clients": p.shape[1], "rounds": p.shape[0], "dims": sums.shape[1], "seconds": r.seconds,
           "exact": bool(np.array_equal(r.participation, p)),
           "wrong_entries": int((r.participation != p).sum())}  # fmt: skip
    if u is not None:
        out["max_update_error"] = float(np.abs(r.updates - u).max())
    print(out, file=sys.stderr)
    return out


def _synthetic(n: int, t: int, d: int, rate: float = 0.5, seed: int = 0):
    rng = np.random.default_rng(seed)
    p = (rng.random((t, n)) < rate).astype(np.int64)
    u = rng.normal(size=(n, d))
    return p, p @ u, u  # the argument order of _run


def case_reference() -> dict:
    return {
        "reference": "Gurobi: 20/200/200 exact in 0.6 s; 50/200/200 at 0.5 exact in 3-6 s; 100/400 refused "
                     "by the free licence; plain HiGHS: 50/200 in 8-13 s, 100/400/400 in 160 s",
        "target": "exact on all three; 50/200 in at most 5 s; 100/400 in at most 60 s",
        "runs": [_run(*_synthetic(20, 200, 200)), _run(*_synthetic(50, 200, 200)),
                 _run(*_synthetic(100, 400, 400))],
    }  # fmt: skip


def case_scale() -> dict:
    runs = []
    for n in (20, 50, 100, 200, 500, 1000):
        runs.append(_run(*_synthetic(n, 2 * n, 200)))
        if runs[-1]["seconds"] > 300:  # the next size would take far longer: stop the curve here
            break
    return {"target": "a scale curve up to at least 1,000 clients", "runs": runs}


def case_noise() -> dict:
    runs = []
    for std in (0.05, 0.1, 0.2):
        p, sums, u = _synthetic(20, 200, 200)
        noisy = sums + np.random.default_rng(1).normal(scale=std, size=sums.shape)
        runs.append({"noise_std": std, **_run(p, noisy, u)})
    return {"target": "exact under Gaussian noise on the sums up to std 0.2 at 20 clients", "runs": runs}


def case_fedavg() -> dict:
    from gradleak.data.partition import IIDPartition
    from gradleak.data.sources import DigitsSource
    from gradleak.fl import FedAvg, LocalTraining, train_client
    from gradleak.models import build_model

    n, t = 20, 200
    data = DigitsSource(image_size=8).load(seed=0)
    clients = IIDPartition(clients=n, batch_size=8).split(data.train, seed=0)
    torch.manual_seed(0)
    model = build_model("mlp", channels=1, image_size=8, num_classes=10, kwargs={"hidden": [32]})
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    p = (np.random.default_rng(0).random((t, n)) < 0.5).astype(np.int64)
    sums, start = [], time.perf_counter()
    for r in range(t):
        updates = [train_client(model, state, clients[k], round=r + 1, settings=LocalTraining(lr=0.05),
                                mean=data.mean, std=data.std, seed=0)[0]
                   for k in range(n) if p[r, k]]  # fmt: skip
        sums.append(np.concatenate([sum(u.delta[k] for u in updates).flatten().numpy()
                                    for k in state if k in updates[0].delta]))  # fmt: skip
        state = FedAvg().aggregate(state, updates)
    train_seconds = time.perf_counter() - start
    out = _run(p, np.stack(sums))
    return {"target": "exact on real FedAvg updates of a small model that trains between rounds",
            "model": "mlp [32] on digits 8x8, lr 0.05, one local epoch", "training_seconds": train_seconds, **out}  # fmt: skip


CASES = {"reference": case_reference, "scale": case_scale, "noise": case_noise, "fedavg": case_fedavg}


def main() -> None:
    run_cases(CASES, "disaggregation", __doc__)


if __name__ == "__main__":
    main()
