"""Kill-and-resume at every file operation of one small run, and concurrent runs on one directory.

A run is started in a child process that dies (``os._exit``, as kill -9 would leave it) just
before its k-th change to the run directory (a manifest entry, a directory, a temporary file, a
rename, an append, a deletion), for every k in turn; ``--resume`` must then finish it with the
uninterrupted run's results and one timing row per result row, leaving no temporary or pending
file behind. CI tries an evenly spaced sample of about 14 of them and the last (about 13 s a trial,
cut and resume, on 2 cores); GRADLEAK_KILL_EVERY=1 tries all.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradleak.experiments import RunStore

CONFIG = {
    "name": "kills",
    "device": "cpu",
    "data": {"source": "digits", "image_size": 8},
    "partition": {
        "scheme": "explicit",
        "clients": [{"size": 4, "batch_size": 2}, {"size": 6, "batch_size": 3}],
    },
    "model": {"name": "mlp", "kwargs": {"hidden": [8]}},
    "training": {"rounds": 2, "lr": 0.1},
    "engine": {"threads": 1},
}

# Runs ``gradleak run`` in this process, counting the changes to the run directory (every one goes
# through ``gradleak.rundir``, whose ``on_change`` hook sees it first), and dies just before change
# KILL_AT (0: never; the count is printed at the end).
CHILD = r"""
import os, sys
from gradleak import rundir

kill_at, count = int(os.environ["KILL_AT"]), [0]

def step(op, rel):
    count[0] += 1
    if count[0] == kill_at:
        os._exit(137)

rundir.on_change = step

from gradleak.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print("OPERATIONS", count[0])
"""


def _run(args: list[str], run_dir: Path, kill_at: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "KILL_AT": str(kill_at), "RUN_DIR": str(run_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True, timeout=300
    )


def _outputs(run: Path) -> tuple[bytes, bytes, bytes]:
    return (
        (run / "results.jsonl").read_bytes(),
        (run / "rounds.jsonl").read_bytes(),
        (run / "checkpoints/global_0002.safetensors").read_bytes(),
    )


@pytest.mark.slow
def test_a_kill_at_every_file_operation_resumes_to_the_same_results(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    whole = tmp_path / "whole"
    done = _run(["run", str(config), "--out", str(whole), "-q"], whole, 0)
    assert done.returncode == 0, done.stderr
    operations = int(done.stdout.split("OPERATIONS")[-1])
    assert (
        operations > 60
    )  # manifest, config, checkpoints, updates, rows, report: every one is a trial
    expected = _outputs(whole)
    every = int(os.environ.get("GRADLEAK_KILL_EVERY", str(max(1, operations // 14))))
    for k in sorted({*range(1, operations + 1, every), operations}):
        run = tmp_path / f"cut{k}"
        cut = _run(["run", str(config), "--out", str(run), "-q"], run, k)
        assert cut.returncode == 137, (k, cut.stderr[-2000:])
        resumed = _run(["run", str(config), "--out", str(run), "-q", "--resume"], run, 0)
        assert resumed.returncode == 0, (k, resumed.stdout[-2000:], resumed.stderr[-2000:])
        assert _outputs(run) == expected, k
        leftovers = [p for p in run.rglob("*") if p.suffix == ".tmp" or "pending" in p.parts]
        assert not leftovers, (k, leftovers)
        assert json.loads((run / "results.jsonl").read_text().splitlines()[-1])["round"] == 2
        store = RunStore(run)  # one timing row per result row, none lost or repeated
        assert [(t["round"], t["client"]) for t in store.timings.read()] == [
            (r["round"], r["client"]) for r in store.results.read()
        ], k


def test_two_processes_on_one_directory_one_runs_the_other_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "training": {"rounds": 3, "lr": 0.1}}))
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "gradleak", "run", str(config), "--out", str(out), "-q", *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for extra in ([], ["--resume"])
    ]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]  # type: ignore[union-attr]
    codes = sorted(code for code, _ in results)
    # either one was refused while the other ran, or the second found the first's run finished
    # and resumed nothing; never both writing: 3 rounds x 2 clients, each row once
    assert codes in ([0, 0], [0, 2]), results
    for code, output in results:
        if code == 2:
            lines = [line for line in output.splitlines() if line.strip()]
            assert len(lines) == 1 and (
                "in use by another gradleak process" in lines[0]
                or "already holds a run" in lines[0]
            ), output
    store = RunStore(out)
    assert [(r["round"], r["client"]) for r in store.results.read()] == [
        (r, c) for r in (1, 2, 3) for c in (1, 2)
    ]
    assert len(store.rounds.read()) == 3


def test_ctrl_c_at_any_moment_of_any_command_ends_cleanly(
    tmp_path: Path, saved_update: list[str]
) -> None:
    """SIGINT at generated moments (while Python loads, while starting, during the work, while
    writing) of every long command: a traceback never; exit 130 with at most the 'interrupted'
    line, or 0 when the work was already done; an interrupted run resumes to completion."""
    import random
    import signal
    import time

    import numpy as np

    config = tmp_path / "c.yaml"
    audited = {
        **CONFIG,
        "training": {"rounds": 3, "lr": 0.1},
        "audit": {"clients": [1], "attack": {"iterations": 300}},
    }
    config.write_text(yaml.safe_dump(audited))
    done = tmp_path / "done"
    assert (
        subprocess.run(
            [sys.executable, "-m", "gradleak", "run", str(config), "--out", str(done), "-q"],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
        ).returncode
        == 0
    )
    rng = np.random.default_rng(0)
    p = (rng.random((24, 6)) < 0.5).astype(float)
    np.savez(tmp_path / "sums.npz", sums=p @ rng.normal(size=(6, 50)))
    np.savetxt(tmp_path / "counts.csv", p.reshape(4, 6, 6).sum(1), delimiter=",", fmt="%d")
    attack = [*saved_update, "-s", "iterations=4000"]
    commands = {
        "run": lambda o: ["run", str(config), "--out", o],
        "report": lambda o: ["report", str(done)],
        "attack": lambda o: ["attack", *attack, "--out", o],
        "sweep": lambda o: [
            "sweep",
            str(config),
            "-s",
            "audit.attack.iterations=100,200",
            "--out",
            o,
        ],
        "disaggregate": lambda o: [
            "disaggregate",
            "--sums",
            str(tmp_path / "sums.npz"),
            "--counts",
            str(tmp_path / "counts.csv"),
            "--window",
            "6",
            "--workers",
            "1",
            "--out",
            o,
        ],
    }
    moments = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    for name, args in commands.items():
        for i, delay in enumerate([moments.uniform(0.05, 1.0), moments.uniform(1.0, 6.0)]):
            out = str(tmp_path / f"{name}{i}")
            proc = subprocess.Popen(
                [sys.executable, "-m", "gradleak", *args(out)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(delay)
            proc.send_signal(signal.SIGINT)
            output = proc.communicate(timeout=120)[0]
            case = (name, round(delay, 2), proc.returncode, output[-1500:])
            assert "Traceback" not in output and "KeyboardInterrupt" not in output, case
            # 0: done before the signal (or it landed as Python exited); 130: interrupted
            assert proc.returncode in (0, 130, -signal.SIGINT), case
            if proc.returncode == 130:
                said = [line for line in output.splitlines() if line.startswith("interrupted")]
                assert len(said) <= 1, case
            if name == "run" and Path(out, "config.yaml").exists():
                resumed = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "gradleak",
                        "run",
                        str(config),
                        "--out",
                        out,
                        "-q",
                        "--resume",
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                )
                assert resumed.returncode == 0, (case, resumed.stderr[-1500:])
                assert (
                    Path(out, "rounds.jsonl").read_bytes() == (done / "rounds.jsonl").read_bytes()
                ), case


@pytest.mark.slow
def test_demo_after_a_start_killed_at_each_step_continues(tmp_path: Path) -> None:
    """``gradleak demo`` killed at each file operation of its start (the lock, the config,
    checkpoint
    0, the log) and called again: it finishes, with the uninterrupted demo's rounds."""
    small = ["-s", "training.rounds=1", "-s", "audit=null", "-q"]
    whole = tmp_path / "whole"
    assert _run(["demo", "--out", str(whole), *small], whole, 0).returncode == 0
    expected = (whole / "rounds.jsonl").read_bytes()
    for k in range(1, 8, min(2, int(os.environ.get("GRADLEAK_KILL_EVERY", "2")))):  # CI: every 2nd
        run = tmp_path / f"cut{k}"
        cut = _run(["demo", "--out", str(run), *small], run, k)
        assert cut.returncode == 137, (k, cut.stderr[-2000:])
        again = _run(["demo", "--out", str(run), *small], run, 0)
        assert again.returncode == 0, (k, again.stdout[-2000:], again.stderr[-2000:])
        assert (run / "rounds.jsonl").read_bytes() == expected, k
        assert (run / "report" / "index.html").exists(), k
