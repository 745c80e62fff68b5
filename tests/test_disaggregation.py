"""Gradient disaggregation: exact and noisy recovery, solver failures, ill-posed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from gradleak.attacks.disaggregation import (
    IllPosed,
    SolverFailure,
    disaggregate,
    participation_columns,
    window_counts,
)


def _case(n=6, t=60, d=40, rate=0.5, seed=0):
    rng = np.random.default_rng(seed)
    p = (rng.random((t, n)) < rate).astype(np.int64)
    u = rng.normal(size=(n, d))
    return p, u, p @ u


def test_window_counts() -> None:
    p = np.array([[1, 0], [1, 1], [0, 1], [1, 1], [0, 0]])
    assert window_counts(p, 2).tolist() == [[2, 1], [1, 2], [0, 0]]


def test_exact_recovery_of_participation_and_updates() -> None:
    p, u, sums = _case()
    r = disaggregate(sums, window_counts(p, 10), 10, workers=1)
    assert np.array_equal(r.participation, p)
    np.testing.assert_allclose(r.updates, u, atol=1e-9)
    assert r.residuals.max() < 1e-6


def test_a_subset_of_columns_is_solved_alone() -> None:
    # Two of 40 clients: each column's program still spans the whole federation's column space.
    p, _, sums = _case(n=40, t=160, d=60, seed=4)
    cols = participation_columns(sums, window_counts(p, 10), 10, only=[3, 17], workers=2)
    assert sorted(cols) == [3, 17]
    for k, col in cols.items():
        assert np.array_equal(col, p[:, k])


def test_noisy_sums_are_recovered() -> None:
    p, u, sums = _case(n=8, t=80, d=100, seed=1)
    noisy = sums + np.random.default_rng(2).normal(scale=0.1, size=sums.shape)
    r = disaggregate(noisy, window_counts(p, 10), 10, workers=2)
    assert np.array_equal(r.participation, p)
    # Least squares on noisy sums: close to the truth, not exact.
    assert np.abs(r.updates - u).max() < 0.2


def test_a_solver_time_out_is_an_error_naming_the_client() -> None:
    p, _, sums = _case(n=30, t=120, d=60, seed=3)
    with pytest.raises(SolverFailure, match=r"client \d+, rounds 0-119: HiGHS status"):
        disaggregate(sums, window_counts(p, 10), 10, time_limit=1e-9, workers=1)


@pytest.mark.parametrize("solver", ["scip", "gurobi"])
def test_optional_back_ends_recover_exact_and_noisy_sums(solver) -> None:
    pytest.importorskip({"scip": "pyscipopt", "gurobi": "gurobipy"}[solver])  # installed by the test extra
    p, u, sums = _case(n=6, t=40, d=30, seed=5)  # small: within Gurobi's bundled size-limited licence
    r = disaggregate(sums, window_counts(p, 10), 10, workers=1, solver=solver)
    assert np.array_equal(r.participation, p)
    np.testing.assert_allclose(r.updates, u, atol=1e-8)
    # Noise 0.01: SCIP takes about 24 s to prove the L1 program optimal at 0.05 (HiGHS: about 2 s).
    noisy = sums + np.random.default_rng(6).normal(scale=0.01, size=sums.shape)
    assert np.array_equal(disaggregate(noisy, window_counts(p, 10), 10, workers=1, solver=solver).participation, p)
    wrong = window_counts(p, 10)
    wrong[0, 0] += 1 if wrong[0, 0] < 10 else -1  # no binary column of the sums has these counts
    with pytest.raises(SolverFailure, match=r"client 4, rounds 0-39: (SCIP|Gurobi) status"):
        disaggregate(sums, wrong, 10, workers=1, solver=solver, client_ids=[4, 5, 6, 7, 8, 9])


def test_an_unknown_or_missing_solver_is_refused_by_name(monkeypatch) -> None:
    from gradleak.attacks import milp
    from gradleak.errors import ConfigError

    p, _, sums = _case()
    with pytest.raises(ConfigError, match="unknown solver 'cplex'"):
        disaggregate(sums, window_counts(p, 10), 10, solver="cplex")
    monkeypatch.setattr(milp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"needs the pyscipopt package: pip install 'gradleak\[scip\]'"):
        disaggregate(sums, window_counts(p, 10), 10, solver="scip")


def test_ill_posed_inputs_are_refused_before_solving() -> None:
    p, _, sums = _case(n=6, t=60)
    with pytest.raises(IllPosed, match="5 rounds for 6 clients"):
        disaggregate(sums[:5], window_counts(p[:5], 5), 5)
    twins = p.copy()
    twins[:, 1] = twins[:, 0]  # two clients always together: their columns cannot be told apart
    with pytest.raises(IllPosed, match="rank below 6"):
        disaggregate(twins @ np.random.default_rng(0).normal(size=(6, 40)), window_counts(twins, 10), 10)
    with pytest.raises(IllPosed, match="counts have 3 windows"):
        disaggregate(sums, np.zeros((3, 6), dtype=np.int64), 10)  # 60 rounds make 6 windows of 10
    with pytest.raises(IllPosed, match="larger than its window"):
        disaggregate(sums, window_counts(p, 10) + 20, 10)


def test_cli_on_csv_and_npz_files(tmp_path) -> None:
    from typer.testing import CliRunner

    from gradleak.cli import app

    p, u, sums = _case()
    np.savetxt(tmp_path / "sums.csv", sums, delimiter=",")
    np.savez(tmp_path / "counts.npz", counts=window_counts(p, 10))
    result = CliRunner().invoke(app, ["disaggregate", "--sums", str(tmp_path / "sums.csv"), "--counts",
                                      str(tmp_path / "counts.npz"), "--window", "10", "--out", str(tmp_path / "o")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.loadtxt(tmp_path / "o/participation.csv", delimiter=",", dtype=int), p)
    np.testing.assert_allclose(np.load(tmp_path / "o/updates.npz")["updates"], u, atol=1e-9)
    bad = CliRunner().invoke(app, ["disaggregate", "--sums", str(tmp_path / "sums.csv"), "--counts",
                                   str(tmp_path / "counts.npz"), "--window", "7", "--out", str(tmp_path / "o")])  # fmt: skip
    assert bad.exit_code == 2 and "counts have 6 windows" in bad.output
