"""Engine adapters: the same experiment on Flower gives the in-process run's results exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gradleak.errors import ConfigError
from gradleak.experiments import run_experiment
from gradleak.experiments.config import validate_config

# Three clients with a defence (seeded noise) and an audit that withholds the high-risk client's
# leaking updates: every path of the client filters crosses the engine.
CONFIG = {
    "name": "engines",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {"scheme": "explicit", "clients": [
        {"size": 1, "batch_size": 1}, {"size": 20, "batch_size": 4}, {"size": 30, "batch_size": 8},
    ]},  # fmt: skip
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "training": {"rounds": 3, "lr": 0.1, "momentum": 0.5},
    "defenses": [{"name": "gaussian", "sigma": 1e-4}],
    "audit": {"clients": [1], "frequency": 2, "preset": "inverting-gradients",
              "attack": {"iterations": 30}, "metric": "psnr", "threshold": 0.0},  # fmt: skip
    "engine": {"threads": 1},
}


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_secure_sum_and_missing_extras_are_refused_before_training(monkeypatch, tmp_path) -> None:
    cfg = validate_config({**CONFIG, "engine": {"name": "flower"}, "audit": None,
                           "aggregation": {"strategy": "secure-sum"}})  # fmt: skip
    with pytest.raises(ConfigError, match="aggregation.strategy.*secure-sum is not available on the flower"):
        run_experiment(cfg, tmp_path / "a")
    import gradleak.engines as engines

    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"engine.name.*pip install -c constraints.txt 'gradleak\[flower\]'"):
        run_experiment(validate_config({**CONFIG, "engine": {"name": "flower"}}), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _same_run(local: Path, other: Path) -> None:
    """Every field of results.jsonl but wall-clock ones, rounds.jsonl, the final checkpoint and the
    audit files are the same."""
    a, b = _rows(local / "results.jsonl"), _rows(other / "results.jsonl")
    assert [(r["round"], r["client"]) for r in a] == [(r["round"], r["client"]) for r in b]
    assert any(r.get("withheld") for r in a) and any(r.get("audited") for r in a)  # both paths crossed
    drop = {"attack_seconds"}  # wall-clock fields
    assert [{k: v for k, v in r.items() if k not in drop} for r in a] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b]  # fmt: skip
    assert (local / "rounds.jsonl").read_bytes() == (other / "rounds.jsonl").read_bytes()
    final = "checkpoints/global_0003.safetensors"
    sa, sb = load_file(local / final), load_file(other / final)
    assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
    assert sorted(p.name for p in (local / "audit").rglob("*")) == sorted(p.name for p in (other / "audit").rglob("*"))


@pytest.fixture(scope="module")
def sequential(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("engines") / "inprocess"
    run_experiment(validate_config(CONFIG), out)
    return out


def test_a_pool_of_workers_gives_the_sequential_results_exactly(sequential, tmp_path) -> None:
    run_experiment(validate_config({**CONFIG, "engine": {"threads": 1, "workers": 2}}), tmp_path / "pool")
    _same_run(sequential, tmp_path / "pool")


@pytest.mark.engines
def test_flower_gives_the_in_process_results_exactly(sequential, tmp_path) -> None:
    pytest.importorskip("flwr")
    run_experiment(validate_config({**CONFIG, "engine": {"name": "flower", "threads": 1}}), tmp_path / "flower")
    _same_run(sequential, tmp_path / "flower")
