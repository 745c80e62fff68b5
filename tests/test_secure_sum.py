"""Secure aggregation: what the server sees, and the disaggregation chain on a secure-sum run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from gradleak.errors import ConfigError
from gradleak.experiments import RunStore, run_experiment
from gradleak.experiments.config import validate_config
from gradleak.experiments.runner import build_scenario
from gradleak.experiments.secure_sum import participation_matrix
from gradleak.fl.server import SecureSum
from gradleak.fl.update import ClientUpdate, UpdateMeta
from gradleak.report.html import build_run_report

# Five clients, each holding one digit class (distinct updates), one local step per round,
# three of five per round: the server sees only the sums.
CHAIN = {
    "name": "chain",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {
        "scheme": "explicit",
        "clients": [
            {"size": 1, "batch_size": 1, "classes": [0]},
            {"size": 4, "batch_size": 4, "classes": [1]},
            {"size": 8, "batch_size": 8, "classes": [2]},
            {"size": 16, "batch_size": 16, "classes": [3]},
            {"size": 32, "batch_size": 32, "classes": [4]},
        ],
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "training": {"rounds": 20, "lr": 0.01, "clients_per_round": 0.6},
    "aggregation": {"strategy": "secure-sum"},
    "disaggregation": {"window": 5, "invert": [1]},
    "audit": {
        "clients": [],
        "preset": "inverting-gradients",
        "attack": {"iterations": 200},
        "metric": "psnr",
    },
}


def _update(cid: int, n: int, value: float) -> ClientUpdate:
    meta = UpdateMeta(
        client_id=cid, round=1, num_samples=n, lr=0.1, epochs=1, steps=1, batch_size=n
    )
    delta = {"w": torch.full((2, 2), value), "count": torch.tensor(2)}
    return ClientUpdate(delta, meta, frozenset({"count"}))


def test_secure_sum_reveals_the_sum_and_steps_by_the_mean() -> None:
    updates = [_update(1, 1, 1.0), _update(2, 100, 3.0)]
    strategy = SecureSum()
    seen = strategy.observation(updates)
    assert torch.equal(seen["w"], torch.full((2, 2), 4.0, dtype=torch.float64))
    new = strategy.aggregate({"w": torch.zeros(2, 2), "count": torch.tensor(5)}, updates)
    assert torch.equal(new["w"], torch.full((2, 2), 2.0))  # equal weights: sample counts are hidden
    assert int(new["count"]) == 7
    assert strategy.aggregate({"w": torch.ones(1)}, []) == {"w": torch.ones(1)}


def test_disaggregation_config_errors_name_the_key(tmp_path) -> None:
    fedavg = {**CHAIN, "aggregation": {"strategy": "fedavg"}}
    with pytest.raises(ConfigError, match="disaggregation: needs aggregation.strategy: secure-sum"):
        run_experiment(validate_config(fedavg), tmp_path / "a")
    no_audit = {k: v for k, v in CHAIN.items() if k != "audit"}
    with pytest.raises(ConfigError, match="disaggregation.invert: needs an audit"):
        run_experiment(validate_config(no_audit), tmp_path / "b")
    unknown = {**CHAIN, "disaggregation": {"window": 5, "invert": [9]}}
    with pytest.raises(
        ConfigError,
        match=r"disaggregation.invert: client 9 is not one of the run's clients \(1 to 5\)",
    ):
        run_experiment(validate_config(unknown), tmp_path / "c")
    with pytest.raises(
        ConfigError, match="disaggregation.solver: Input should be 'highs', 'scip' or 'gurobi'"
    ):
        validate_config({**CHAIN, "disaggregation": {"window": 5, "solver": "cplex"}})
    from gradleak.attacks.disaggregation import milp

    with pytest.MonkeyPatch.context() as mp:  # as on a machine without PySCIPOpt
        mp.setattr(milp.importlib.util, "find_spec", lambda name: None)
        scip = {**CHAIN, "disaggregation": {"window": 5, "invert": [1], "solver": "scip"}}
        with pytest.raises(
            ConfigError, match=r"disaggregation.solver: solver 'scip' needs the pyscipopt package"
        ):
            run_experiment(validate_config(scip), tmp_path / "d")
    short = {
        **CHAIN,
        "training": {**CHAIN["training"], "rounds": 4},
    }  # 5 clients need 5 rounds at least
    with pytest.raises(
        ConfigError,
        match=r"^training.rounds: disaggregation needs at least as many rounds as "
        r"clients: 4 rounds for 5 clients$",
    ):
        run_experiment(validate_config(short), tmp_path / "e")
    assert not any((tmp_path / d).exists() for d in ("a", "b", "c", "d", "e"))


def test_chain_recovers_participation_and_the_one_image_client(tmp_path) -> None:
    run_experiment(validate_config(CHAIN), tmp_path / "run")
    store = RunStore(tmp_path / "run")
    sums = store.load_secure_sums()
    assert len(sums) == 20 and not any(r.get("audited") for r in store.results.read())
    # what the server saw is the sum of the round's updates: check round 1 against retraining
    sim = build_scenario(validate_config(CHAIN)).simulator()
    state0 = store.load_checkpoint(0)
    real = [sim.run_client(1, state0, c).update.delta for c in sim.participants(1)]
    assert sums[0].keys() == real[0].keys()
    for k, v in sums[0].items():
        torch.testing.assert_close(v, sum(d[k].double() for d in real), rtol=0, atol=1e-9)
    truth = participation_matrix(store, [1, 2, 3, 4, 5])
    assert truth.sum(1).tolist() == [3] * 20
    summary = json.loads((tmp_path / "run" / "disaggregation" / "summary.json").read_text())
    assert summary["participation_exact"] and summary["wrong_entries"] == 0
    (inv,) = summary["inverted"]
    assert inv["client"] == 1 and inv["rounds_taken_part"] == int(truth[:, 0].sum())
    assert inv["psnr"] > 25 and inv["rdlv"] > 0.5 and inv["label_accuracy"] == 1.0
    saved = np.load(
        tmp_path / "run" / "disaggregation" / f"round_{inv['round']:04d}" / "client_1.npz"
    )
    assert saved["reconstructions"].shape == (1, 1, 8, 8)
    page = build_run_report(tmp_path / "run").read_text()
    assert (
        "Secure aggregation: gradient disaggregation" in page and "recovered <b>exactly</b>" in page
    )
