"""Engine adapters: the same experiment on Flower gives the in-process run's results exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gradleak.errors import ConfigError
from gradleak.experiments import RunStore, run_experiment
from gradleak.experiments.config import validate_config
from gradleak.experiments.runner import build_scenario
from gradleak.rundir import OwnedDir

# Three clients with a defence (seeded noise) and an audit that withholds the high-risk client's
# leaking updates: every path of the client filters crosses the engine.
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
    "training": {"rounds": 3, "lr": 0.1, "momentum": 0.5},
    "defenses": [{"name": "gaussian", "sigma": 1e-4}],
    "audit": {
        "clients": [1],
        "frequency": 2,
        "preset": "inverting-gradients",
        "attack": {"iterations": 30},
        "metric": "psnr",
        "threshold": 0.0,
    },
    "engine": {"threads": 1},
}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_secagg_overflow_too_few_participants_and_missing_extras_are_refused_before_training(
    monkeypatch, tmp_path
) -> None:
    import gradleak.experiments.engines as engines

    monkeypatch.setattr(engines, "check_installed", lambda name: None)  # the checks come first
    secure = {**CONFIG, "audit": None, "aggregation": {"strategy": "secure-sum"}}
    # 3 participants x 2^31 - 1 levels overflow the 2^32 modulus; 2 x the same would not
    cfg = validate_config(
        {**secure, "engine": {"name": "flower", "secagg": {"quantization": 2**31 - 1}}}
    )
    with pytest.raises(
        ConfigError,
        match=r"^engine.secagg.quantization: 3 participants x 2147483647 levels "
        r"overflow SecAgg\+'s modulus 2\^32: use at most 1431655765",
    ):
        run_experiment(cfg, tmp_path / "a")
    one = validate_config(
        {**secure, "engine": {"name": "flower"}, "training": {"clients_per_round": 0.3}}
    )
    with pytest.raises(
        ConfigError, match=r"^training.clients_per_round: SecAgg\+ needs at least 2 participants"
    ):
        run_experiment(one, tmp_path / "a")
    monkeypatch.undo()

    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"engine.name.*pip install -c constraints.txt 'gradleak\[flower\]'"
    ):
        run_experiment(validate_config({**CONFIG, "engine": {"name": "flower"}}), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(
        ConfigError, match=r"^engine.secagg.quantization: Input should be less than 2147483648"
    ):
        validate_config({**CONFIG, "engine": {"secagg": {"quantization": 2**31}}})


def _same_run(local: Path, other: Path) -> None:
    """Every field of results.jsonl but wall-clock ones, rounds.jsonl, the final checkpoint and the
    audit files are the same."""
    a, b = _rows(local / "results.jsonl"), _rows(other / "results.jsonl")
    assert [(r["round"], r["client"]) for r in a] == [(r["round"], r["client"]) for r in b]
    assert any(r.get("withheld") for r in a) and any(
        r.get("audited") for r in a
    )  # both paths crossed
    drop = {"attack_seconds"}  # wall-clock fields
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == [
        {k: v for k, v in r.items() if k not in drop} for r in b
    ]
    assert (local / "rounds.jsonl").read_bytes() == (other / "rounds.jsonl").read_bytes()
    final = "checkpoints/global_0003.safetensors"
    sa, sb = load_file(local / final), load_file(other / final)
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
    assert sorted(p.name for p in (local / "audit").rglob("*")) == sorted(
        p.name for p in (other / "audit").rglob("*")
    )


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "inprocess"
    run_experiment(validate_config(CONFIG), out)
    return out


@pytest.mark.parametrize("pool", ["processes", pytest.param("ray", marks=pytest.mark.engines)])
def test_a_pool_of_workers_gives_the_sequential_results_exactly(sequential, tmp_path, pool) -> None:
    if pool == "ray":
        pytest.importorskip("ray")
    config = validate_config({**CONFIG, "engine": {"threads": 1, "workers": 2, "pool": pool}})
    sim = build_scenario(config).simulator(OwnedDir(tmp_path / "pool", "run"))
    assert (type(sim).__name__, sim.kind) == ("PoolSimulator", pool)
    run_experiment(config, tmp_path / "pool")
    _same_run(sequential, tmp_path / "pool")


def test_a_ray_pool_without_ray_is_refused_naming_the_extra(monkeypatch, tmp_path) -> None:
    import gradleak.experiments.engines as engines
    from gradleak.engines.pool import pool_kind

    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)
    assert pool_kind("auto") == "processes"
    config = validate_config({**CONFIG, "engine": {"workers": 2, "pool": "ray"}})
    with pytest.raises(
        ConfigError,
        match=r"^engine.pool: ray needs ray: pip install -c constraints.txt 'gradleak\[ray\]'",
    ):
        run_experiment(config, tmp_path / "a")
    assert not (tmp_path / "a").exists()


@pytest.mark.engines
def test_flower_gives_the_in_process_results_exactly(sequential, tmp_path) -> None:
    pytest.importorskip("flwr")
    run_experiment(
        validate_config({**CONFIG, "engine": {"name": "flower", "threads": 1}}), tmp_path / "flower"
    )
    _same_run(sequential, tmp_path / "flower")


# SecAgg+: four clients, three a round, one of them withheld by the audit in its audited rounds
# (it then sends zeros), float64 updates well inside the clip.
SECAGG = {
    **CONFIG,
    "name": "secagg",
    "partition": {
        "scheme": "explicit",
        "clients": [
            {"size": 1, "batch_size": 1},
            {"size": 20, "batch_size": 4},
            {"size": 30, "batch_size": 8},
            {"size": 15, "batch_size": 5},
        ],
    },
    "training": {"rounds": 4, "lr": 0.02, "clients_per_round": 0.75},
    "aggregation": {"strategy": "secure-sum"},
    "defenses": [],
    "checkpoints": {"keep_every": 1},
    "audit": {**CONFIG["audit"], "threshold": -10.0},  # every audited update withheld
    "engine": {"name": "flower", "threads": 1},
}


@pytest.mark.engines
def test_secagg_round_sums_match_the_plain_sums(tmp_path) -> None:
    pytest.importorskip("flwr")
    cfg = validate_config(SECAGG)
    run_experiment(cfg, tmp_path / "run")
    store = RunStore(tmp_path / "run")
    rows, rounds = store.results.read(), store.rounds.read()
    assert len(rounds) == 4 and all(len(r["clients"]) == 3 for r in rounds)
    assert {r["client"] for r in rows} == {1, 2, 3, 4} and any(r["withheld"] for r in rows)
    assert all(r["secagg_clipped"] == 0.0 for r in rows)
    assert not store.pending.exists()
    # The plain sum of each round, recomputed here from the round's global model: SecAgg+'s sum
    # (what the server recorded) is within 1e-8 of it, withheld updates left out.
    sim = build_scenario(cfg).simulator(engine="local")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the clients trained (engine.threads)
    by_id = {c.client_id: c for c in sim.clients}
    worst = 0.0
    for r in rounds:
        start = store.load_checkpoint(r["round"] - 1)
        results = [sim.run_client(r["round"], start, by_id[c]) for c in r["clients"]]
        assert [res.withheld for res in results] == [
            row["withheld"] for row in rows if row["round"] == r["round"]
        ]
        plain = {
            k: sum(
                (res.update.delta[k].double() for res in results if not res.withheld),
                torch.zeros_like(start[k], dtype=torch.float64),
            )
            for k in start
        }
        got = load_file(tmp_path / f"run/secure_sum/round_{r['round']:04d}.safetensors")
        assert got.keys() == plain.keys() and all(v.dtype == torch.float64 for v in got.values())
        worst = max(worst, *(float((got[k] - plain[k]).abs().max()) for k in got))
        assert r["aggregated"] == sum(not res.withheld for res in results)
    torch.set_num_threads(threads)
    assert 0 < worst < 1e-8  # quantised (not the plain sum), yet within 1e-8


@pytest.mark.engines
def test_disaggregation_of_a_recorded_secagg_run_is_exact(tmp_path) -> None:
    """The chain of tests/test_secure_sum.py on sums that Flower's SecAgg+ computed."""
    pytest.importorskip("flwr")
    from test_secure_sum import CHAIN  # tests/ is on the path (rootdir conftest)

    cfg = validate_config({**CHAIN, "engine": {"name": "flower", "threads": 1}})
    run_experiment(cfg, tmp_path / "run")
    summary = json.loads((tmp_path / "run/disaggregation/summary.json").read_text())
    assert summary["participation_exact"] and summary["wrong_entries"] == 0
    assert summary["rounds"] == 20 and summary["clients"] == 5
    assert summary["inverted"][0]["psnr"] > 20  # client 1's one image, from its recovered update


def test_a_resume_repeats_a_round_that_must_run_whole(tmp_path) -> None:
    """Under SecAgg+ a round is one protocol run: a resume drops its finished clients and repeats
    it (a partial round's updates were never seen, so they cannot be summed later)."""
    small = {
        **CONFIG,
        "audit": None,
        "defenses": [],
        "training": {"rounds": 2, "lr": 0.1},
        "checkpoints": {"keep_every": 1},
    }
    run_experiment(validate_config(small), tmp_path / "run")
    store = RunStore(tmp_path / "run").claim()
    rows = store.results.read()
    # as a run killed after two clients of round 2 leaves it
    store.rounds.rewrite(store.rounds.read()[:1])
    store.results.rewrite(rows[:5])
    for row in rows[3:5]:
        store.dir.write_bytes(f"pending/round_0002/client_{row['client']}.safetensors", b"")
    assert store.resume_point(partial=False) == (1, {})
    assert store.results.read() == rows[:3] and not store.pending.exists()


@pytest.mark.engines
def test_nvflare_gives_the_in_process_results_exactly(sequential, tmp_path) -> None:
    pytest.importorskip("nvflare")

    class Seen:  # the driver's display, which follows the rows NVFlare's server process writes
        def __init__(self) -> None:
            self.events: list[tuple] = []

        def round_started(self, round, clients) -> None:  # noqa: ANN001
            self.events.append(("start", round, [c.client_id for c in clients]))

        def client_done(self, result) -> None:  # noqa: ANN001
            self.events.append(("client", result.update.meta.round, result.update.meta.client_id))

        def round_done(self, result, state) -> None:  # noqa: ANN001
            self.events.append(("done", result.round, result.test_accuracy))

    seen = Seen()
    config = validate_config({**CONFIG, "engine": {"name": "nvflare", "threads": 1}})
    run_experiment(config, tmp_path / "nvflare", display=seen)
    _same_run(sequential, tmp_path / "nvflare")
    rounds = _rows(tmp_path / "nvflare" / "rounds.jsonl")
    expected = [
        e
        for r in rounds
        for e in [
            ("start", r["round"], r["clients"]),
            *[("client", r["round"], c) for c in r["clients"]],
            ("done", r["round"], r["test_accuracy"]),
        ]
    ]
    assert seen.events == expected


def test_nvflare_filter_errors_are_recorded_and_withhold_the_update(tmp_path) -> None:
    pytest.importorskip("nvflare")
    import numpy as np
    from nvflare.apis.dxo import DXO, DataKind
    from nvflare.apis.fl_constant import ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.shareable import Shareable

    from gradleak.engines.nvflare import ROW, UpdateFilters

    config_json = validate_config(CONFIG).model_dump_json()
    OwnedDir(tmp_path, "run").claim()  # the run directory the job's driver claimed
    fields = {
        "train_loss": 1.0,
        "seconds": 0.5,
        "buffers": [],
        "meta": {
            "client_id": 2,
            "round": 1,
            "num_samples": 20,
            "lr": 0.1,
            "epochs": 1,
            "steps": 5,
            "batch_size": 4,
        },
    }
    dxo = DXO(
        DataKind.WEIGHT_DIFF,
        data={"w": np.ones(3, dtype=np.float32)},
        meta={ROW: json.dumps(fields)},
    )
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "site-2", private=False, sticky=False)
    # no global model was captured for this site: the audit cannot run
    out = UpdateFilters(config_json, str(tmp_path)).process_dxo(dxo, Shareable(), ctx)
    row = json.loads(out.meta[ROW])
    assert out.data == {} and row["withheld"] is True
    assert row["record"] == {"filter_error": "KeyError: 'site-2'"} and row["norm"] == pytest.approx(
        3**0.5
    )


def test_engine_clients_compute_with_the_in_process_thread_count() -> None:
    """engine.threads left unset reaches an engine's clients as this process's thread count (the
    count an in-process run uses), and a set value as it is."""
    import json

    import torch

    from gradleak.engines.client_side import client_config_json

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        unset = validate_config({**CONFIG, "engine": {"name": "flower"}})
        assert json.loads(client_config_json(unset))["engine"]["threads"] == 3
        fixed = validate_config({**CONFIG, "engine": {"name": "flower", "threads": 1}})
        assert json.loads(client_config_json(fixed))["engine"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
