"""gradleak's drop-in audit inside a Flower app: the leak it finds there, and a defence stopping it;
JSON output.

    .venv/bin/python benchmarks/dropin.py CASE [CASE ...]     (or: all)

Cases:
  flower  the quickstart-pytorch-shaped app of the tests (its own CNN, loader normalised with mean
          and std 0.5, SGD lr 0.05 with momentum 0.9, batch size 2, 2 nodes holding 3 and 4 photo
          tiles, 2 rounds, FedAvg) in Flower's run_simulation with ``leakage_mod`` at 300 Inverting
          Gradients iterations, as it ships, then with ``defense_mod`` stacked under it:
          dp-gaussian clip 0.1 with noise multiplier 0 (clipping alone) and 1. Per variant: each
          row's RDLV, SSIM and PSNR, the defence's epsilon, and the seconds.
Results go to benchmarks/results/dropin_CASE.json and stdout.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from cases import run_cases

TESTS = Path(__file__).resolve().parent.parent / "tests"
VARIANTS = {
    "none": None,
    "clip_0.1": {"name": "dp-gaussian", "clip": 0.1, "noise_multiplier": 0.0},
    "dp_clip_0.1_z1": {"name": "dp-gaussian", "clip": 0.1, "noise_multiplier": 1.0},
}


def case_flower() -> dict:
    sys.path.insert(0, str(TESTS))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p
    )
    from flwr.simulation import run_simulation

    import quickstart_app as qs
    from gradleak.integrations.auditdir import AuditDir
    from gradleak.integrations.flower import defense_mod, leakage_mod

    out: dict = {}
    for name, defense in VARIANTS.items():
        with tempfile.TemporaryDirectory() as tmp:
            audit = Path(tmp) / "audit"
            mods = [
                leakage_mod(
                    qs.Net,
                    data=lambda c: qs.load_data(c.node_config["partition-id"], 2, 2),
                    out=audit,
                    epochs=1,
                    batch_size=2,
                    momentum=0.9,
                    mean=0.5,
                    std=0.5,
                    iterations=300,
                )
            ]
            if defense is not None:
                mods.append(defense_mod(defense, qs.Net))
            start = time.perf_counter()
            run_simulation(
                server_app=qs.server_app({}),
                client_app=qs.client_app(mods=mods),
                num_supernodes=2,
                backend_config={
                    "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                    "init_args": {"num_cpus": 2, "include_dashboard": False},
                },
            )
            seconds = time.perf_counter() - start
            rows = AuditDir.open(audit).read_rows()
        keep = ("round", "client", "num_samples", "rdlv", "ssim", "psnr", "update_norm")
        out[name] = {
            "defense": defense,
            "seconds": seconds,
            "max_rdlv": max(r["rdlv"] for r in rows),
            "rows": [{k: r.get(k) for k in keep} for r in rows],
        }
        print(name, out[name]["max_rdlv"], file=sys.stderr, flush=True)
    return out


CASES = {"flower": case_flower}

if __name__ == "__main__":
    run_cases(CASES, "dropin", __doc__)
