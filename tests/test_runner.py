"""Running experiments: rows, reproducibility, and resuming after an interruption."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from gradleak.errors import ConfigError, GradleakError
from gradleak.experiments import RunStore, load_config, run_experiment
from gradleak.experiments.config import validate_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "name": "small",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {
        "scheme": "explicit",
        "clients": [
            {"size": 20, "batch_size": 4},
            {"size": 30, "batch_size": 8},
            {"size": 1, "batch_size": 1},
        ],
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [32]}},
    "training": {"rounds": 4, "lr": 0.1, "momentum": 0.5},
}
RUN_FILES = ("results.jsonl", "rounds.jsonl")


def _same_outputs(a: Path, b: Path) -> None:
    for name in RUN_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    final = sorted((a / "checkpoints").glob("global_*.safetensors"))[-1].name
    assert (a / "checkpoints" / final).read_bytes() == (b / "checkpoints" / final).read_bytes()


class _Counter:
    """Display hooks that count clients and can interrupt the run after ``stop_after`` of them."""

    def __init__(self, stop_after: int | None = None) -> None:
        self.clients = 0
        self.stop_after = stop_after

    def round_started(self, round, clients) -> None:  # noqa: ANN001
        pass

    def client_done(self, result) -> None:  # noqa: ANN001
        self.clients += 1
        if self.stop_after is not None and self.clients >= self.stop_after:
            raise KeyboardInterrupt

    def round_done(self, result, state) -> None:  # noqa: ANN001
        pass


def test_run_records_every_round_and_client(tmp_path) -> None:
    rounds = run_experiment(validate_config(SMALL), tmp_path / "run")
    store = RunStore(tmp_path / "run")
    rows = store.results.read()
    assert [(r["round"], r["client"]) for r in rows] == [
        (r, c) for r in range(1, 5) for c in (1, 2, 3)
    ]
    assert [r["round"] for r in rounds] == [1, 2, 3, 4]
    assert all(r["aggregated"] == 3 for r in rounds)
    assert rows[0]["steps"] == 5 and rows[1]["steps"] == 4 and rows[2]["steps"] == 1
    assert len(store.timings.read()) == 12
    assert sorted(p.name for p in store.checkpoints.iterdir()) == [
        "global_0000.safetensors",
        "global_0004.safetensors",
    ]
    assert not store.pending.exists()
    assert store.read_config()["training"]["rounds"] == 4
    assert rounds[-1]["test_accuracy"] > 0.3  # it learns (chance is 0.1)


def test_keep_every_keeps_checkpoints(tmp_path) -> None:
    cfg = validate_config({**SMALL, "checkpoints": {"keep_every": 2}})
    run_experiment(cfg, tmp_path)
    names = sorted(p.stem for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["global_0000", "global_0002", "global_0004"]


def test_runs_are_bitwise_reproducible(tmp_path) -> None:
    cfg = validate_config(SMALL)
    run_experiment(cfg, tmp_path / "a")
    run_experiment(cfg, tmp_path / "b")
    _same_outputs(tmp_path / "a", tmp_path / "b")
    other = validate_config({**SMALL, "seed": 1})
    run_experiment(other, tmp_path / "c")
    assert (tmp_path / "a/results.jsonl").read_bytes() != (
        tmp_path / "c/results.jsonl"
    ).read_bytes()


def test_an_existing_run_is_not_overwritten(tmp_path) -> None:
    cfg = validate_config({**SMALL, "training": {"rounds": 1}})
    run_experiment(cfg, tmp_path)
    with pytest.raises(GradleakError, match="already holds a run: pass --resume"):
        run_experiment(cfg, tmp_path)
    changed = validate_config({**SMALL, "training": {"rounds": 1, "lr": 0.2}})
    with pytest.raises(ConfigError, match="^training.lr: differs from the config of the run"):
        run_experiment(changed, tmp_path, resume=True)


def test_resume_after_an_interrupt_mid_round_recomputes_nothing(tmp_path) -> None:
    cfg = validate_config(SMALL)
    run_experiment(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", display=_Counter(stop_after=5))  # round 2, client 2
    store = RunStore(tmp_path / "cut")
    assert len(store.results.read()) == 5 and len(store.rounds.read()) == 1
    again = _Counter()
    run_experiment(cfg, tmp_path / "cut", resume=True, display=again)
    assert again.clients == 12 - 5  # the finished clients of round 2 were not trained again
    _same_outputs(tmp_path / "whole", tmp_path / "cut")
    # Resuming a finished run changes nothing.
    run_experiment(cfg, tmp_path / "cut", resume=True)
    _same_outputs(tmp_path / "whole", tmp_path / "cut")


@pytest.mark.parametrize("name", ["results.jsonl", "rounds.jsonl"])
def test_a_torn_last_line_is_no_row_and_resume_cuts_it(tmp_path, name) -> None:
    cfg = validate_config(SMALL)
    run_experiment(cfg, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", display=_Counter(stop_after=7))
    store = RunStore(tmp_path / "cut")
    torn = store.results if name == "results.jsonl" else store.rounds
    rows = len(torn.read())
    with torn.path.open("a") as f:
        f.write('{"round": 3, "cli')  # what kill -9 in the middle of a write leaves
    assert (
        len(torn.read()) == rows
    )  # for every reader: resume, report (a torn rounds line crashed both)
    run_experiment(cfg, tmp_path / "cut", resume=True)
    _same_outputs(tmp_path / "whole", tmp_path / "cut")


def test_a_start_killed_before_checkpoint_0_resumes_and_leftovers_go(tmp_path, monkeypatch) -> None:
    """Killed between checkpoint 0's temporary file and its rename: the run resumes, gradleak's
    leftovers (listed in its manifest) go, and files it did not write stay untouched."""
    from gradleak import rundir

    cfg = validate_config(SMALL)
    run_experiment(cfg, tmp_path / "whole")

    def killed(op: str, rel: str) -> None:
        if (op, rel) == ("rename", "checkpoints/global_0000.safetensors"):
            raise KeyboardInterrupt

    monkeypatch.setattr(rundir, "on_change", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut")
    monkeypatch.setattr(rundir, "on_change", None)
    assert (tmp_path / "cut/checkpoints/global_0000.safetensors.tmp").exists()
    (tmp_path / "cut/checkpoints/mine.tmp").write_bytes(
        b"the user's"
    )  # not gradleak's: never deleted
    with pytest.raises(GradleakError, match="already holds a run: pass --resume"):
        run_experiment(cfg, tmp_path / "cut")
    run_experiment(cfg, tmp_path / "cut", resume=True)
    _same_outputs(tmp_path / "whole", tmp_path / "cut")
    assert [p.name for p in (tmp_path / "cut").rglob("*.tmp")] == ["mine.tmp"]
    assert (tmp_path / "cut/checkpoints/mine.tmp").read_bytes() == b"the user's"
    # a pending update of a finished round that gradleak wrote (and listed) goes on resume
    RunStore(tmp_path / "cut").claim().dir.write_bytes(
        "pending/round_0002/client_1.safetensors", b"x"
    )
    run_experiment(cfg, tmp_path / "cut", resume=True)
    assert not (tmp_path / "cut/pending").exists()
    _same_outputs(tmp_path / "whole", tmp_path / "cut")


def test_a_run_directory_belongs_to_one_process(tmp_path) -> None:
    cfg = validate_config({**SMALL, "training": {"rounds": 1}})
    store = RunStore(tmp_path / "run").claim()
    held = store.lock()  # as another gradleak process would hold it
    with pytest.raises(GradleakError, match="is in use by another gradleak process"):
        run_experiment(cfg, tmp_path / "run")
    RunStore.unlock(held)
    run_experiment(cfg, tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(GradleakError, match="is a file, not a directory"):
        run_experiment(cfg, tmp_path / "file")


def _gradleak(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "gradleak", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_resume_after_kill_9_gives_the_same_results(tmp_path) -> None:
    cfg = {
        **SMALL,
        "data": {"source": "digits", "image_size": 16},
        "partition": {"scheme": "iid", "clients": 3, "samples_per_client": 200, "batch_size": 8},
        "model": {"name": "convnet", "kwargs": {"width": 8}},
        "training": {"rounds": 6, "lr": 0.05},
    }
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg))
    whole = _gradleak("run", str(config), "--out", str(tmp_path / "whole"), "-q")
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    cut = tmp_path / "cut"
    proc = _gradleak("run", str(config), "--out", str(cut), "-q")
    results = cut / "results.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and results.read_text().count("\n") >= 5:
            break
        time.sleep(0.002)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(RunStore(cut).rounds.read()) < 6
    resumed = _gradleak("run", str(config), "--out", str(cut), "--resume", "-q")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    _same_outputs(tmp_path / "whole", cut)


@pytest.mark.slow
def test_paper_federation_two_rounds_writes_18_rows(tmp_path) -> None:
    # Reduced for CI: 2 rounds and a 30-step audit attack (the shipped config runs 10 and 300).
    config = load_config(
        ROOT / "configs/paper-9-clients.yaml", ["training.rounds=2", "audit.attack.iterations=30"]
    )
    run_experiment(config, tmp_path)
    rows = RunStore(tmp_path).results.read()
    assert len(rows) == 18
    assert [(r["round"], r["client"]) for r in rows if r.get("audited")] == [
        (1, 1),
        (1, 5),
        (1, 9),
        (2, 1),
        (2, 5),
        (2, 9),
    ]
    assert {(r["client"], r["batch_size"], r["num_samples"]) for r in rows if r["round"] == 2} == {
        (1, 4, 8),
        (2, 4, 32),
        (3, 4, 128),
        (4, 4, 512),
        (5, 8, 8),
        (6, 8, 32),
        (7, 8, 128),
        (8, 8, 512),
        (9, 1, 1),
    }
    assert [r["steps"] for r in rows[:9]] == [2, 8, 32, 128, 1, 4, 16, 64, 1]
