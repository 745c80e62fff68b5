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


def test_a_solver_time_out_leaves_the_column_uncertain_and_the_others_go_on() -> None:
    p, _, sums = _case(n=30, t=120, d=60, seed=3)
    r = disaggregate(sums, window_counts(p, 10), 10, time_limit=1e-9, workers=1)
    assert r.participation.shape == p.shape  # every client has a column, from the search
    assert not r.certain.any()  # none is proved: every one says why
    assert all("the solver ran out of time (1e-09 s)" in c.reason for c in r.confidence)


class _Stop(Exception):
    pass


def test_an_interrupted_disaggregation_continues_from_its_journal(tmp_path) -> None:
    """Stopped after 4 of 6 columns: the journal holds those 4, a re-run solves only the other 2
    and gives the uninterrupted result; a journal of other sums is not reused."""
    from gradleak.attacks.disaggregation import ColumnJournal
    from gradleak.rundir import OwnedDir

    p, u, sums = _case()
    whole = disaggregate(sums, window_counts(p, 10), 10, workers=1)
    journal = ColumnJournal(OwnedDir(tmp_path / "out", "disaggregation").claim())

    def stop(done: int, total: int) -> None:
        if done == 4:
            raise _Stop

    with pytest.raises(_Stop):
        disaggregate(sums, window_counts(p, 10), 10, workers=1, journal=journal, progress=stop)
    assert len((tmp_path / "out" / "columns.jsonl").read_text().splitlines()) == 1 + 4
    solved = []
    again = disaggregate(
        sums,
        window_counts(p, 10),
        10,
        workers=1,
        journal=journal,
        progress=lambda done, total: solved.append(total),
    )
    assert set(solved) == {2}
    assert np.array_equal(again.participation, whole.participation) and np.array_equal(
        again.updates, whole.updates
    )
    other = disaggregate(
        2 * sums,
        window_counts(p, 10),
        10,
        workers=1,
        journal=journal,
        progress=lambda done, total: solved.append(total),
    )
    assert solved[-1] == 6 and np.array_equal(other.participation, p)


@pytest.mark.parametrize("solver", ["scip", "gurobi"])
def test_optional_back_ends_recover_exact_and_noisy_sums(solver) -> None:
    pytest.importorskip(
        {"scip": "pyscipopt", "gurobi": "gurobipy"}[solver]
    )  # installed by the test extra
    p, u, sums = _case(
        n=6, t=40, d=30, seed=5
    )  # small: within Gurobi's bundled size-limited licence
    r = disaggregate(sums, window_counts(p, 10), 10, workers=1, solver=solver)
    assert np.array_equal(r.participation, p)
    np.testing.assert_allclose(r.updates, u, atol=1e-8)
    # Noise 0.01: SCIP takes about 24 s to prove the L1 program optimal at 0.05 (HiGHS: about 2 s).
    noisy = sums + np.random.default_rng(6).normal(scale=0.01, size=sums.shape)
    assert np.array_equal(
        disaggregate(noisy, window_counts(p, 10), 10, workers=1, solver=solver).participation, p
    )
    wrong = window_counts(p, 10)
    wrong[0, 0] += 1 if wrong[0, 0] < 10 else -1  # no binary column of the sums has these counts
    with pytest.raises(SolverFailure, match=r"client 4, rounds 0-39: (SCIP|Gurobi) status"):
        disaggregate(sums, wrong, 10, workers=1, solver=solver, client_ids=[4, 5, 6, 7, 8, 9])


def test_an_unknown_or_missing_solver_is_refused_by_name(monkeypatch) -> None:
    from gradleak.attacks.disaggregation import milp
    from gradleak.errors import ConfigError

    p, _, sums = _case()
    with pytest.raises(ConfigError, match="unknown solver 'cplex'"):
        disaggregate(sums, window_counts(p, 10), 10, solver="cplex")
    monkeypatch.setattr(milp.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        ConfigError, match=r"needs the pyscipopt package: pip install 'gradleak\[scip\]'"
    ):
        disaggregate(sums, window_counts(p, 10), 10, solver="scip")


def test_ill_posed_inputs_are_refused_before_solving() -> None:
    p, _, sums = _case(n=6, t=60)
    with pytest.raises(IllPosed, match="5 rounds for 6 clients"):
        disaggregate(sums[:5], window_counts(p[:5], 5), 5)
    twins = p.copy()
    twins[:, 1] = twins[:, 0]  # two clients always together: their columns cannot be told apart
    with pytest.raises(IllPosed, match="rank below 6"):
        disaggregate(
            twins @ np.random.default_rng(0).normal(size=(6, 40)), window_counts(twins, 10), 10
        )
    with pytest.raises(IllPosed, match="counts have 3 windows"):
        disaggregate(sums, np.zeros((3, 6), dtype=np.int64), 10)  # 60 rounds make 6 windows of 10
    with pytest.raises(
        IllPosed,
        match=r"client 0: a participation count of \d+ in rounds 0-9 is negative or larger than "
        r"its interval",
    ):
        disaggregate(sums, window_counts(p, 10) + 20, 10)


def test_cli_on_csv_and_npz_files(tmp_path) -> None:
    from typer.testing import CliRunner

    from gradleak.cli import app

    p, u, sums = _case()
    np.savetxt(tmp_path / "sums.csv", sums, delimiter=",")
    np.savez(tmp_path / "counts.npz", counts=window_counts(p, 10))
    result = CliRunner().invoke(
        app,
        [
            "disaggregate",
            "--sums",
            str(tmp_path / "sums.csv"),
            "--counts",
            str(tmp_path / "counts.npz"),
            "--window",
            "10",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert np.array_equal(np.loadtxt(tmp_path / "o/participation.csv", delimiter=",", dtype=int), p)
    np.testing.assert_allclose(np.load(tmp_path / "o/updates.npz")["updates"], u, atol=1e-9)
    bad = CliRunner().invoke(
        app,
        [
            "disaggregate",
            "--sums",
            str(tmp_path / "sums.csv"),
            "--counts",
            str(tmp_path / "counts.npz"),
            "--window",
            "7",
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert bad.exit_code == 2 and "counts have 6 windows" in bad.output


# -- noisy sums, chunks, per-client intervals, certainty, fail-fast -------------------------------

from gradleak.attacks.disaggregation import Interval, ParticipationLog, UncertainColumns  # noqa: E402


def test_noisy_sums_at_std_half_are_recovered_exactly_and_certain() -> None:
    p, u, sums = _case(n=20, t=200, d=200, seed=0)
    noisy = sums + np.random.default_rng(1).normal(scale=0.5, size=sums.shape)
    r = disaggregate(noisy, window_counts(p, 10), 10, workers=2)
    assert np.array_equal(r.participation, p)
    assert r.certain.all() and min(c.separation for c in r.confidence) > 0.5
    assert all(m.startswith("search") for c in r.confidence for m in c.methods)  # no solver needed


def test_certainty_does_not_fade_with_the_length_of_a_noisy_chunk() -> None:
    # Per-round noise leaves a residual that grows with the rounds of a chunk; the evidence must
    # not shrink with it (a ratio of the runner-up's fit to the column's did, to "uncertain").
    p, _, sums = _case(n=10, t=3000, d=100, seed=2)
    noisy = sums + np.random.default_rng(3).normal(scale=0.3, size=sums.shape)
    seps = {}
    for t in (100, 3000):
        r = disaggregate(noisy[:t], window_counts(p[:t], 10), 10, chunk=0, workers=1)
        assert np.array_equal(r.participation, p[:t]) and r.certain.all()
        seps[t] = min(c.separation for c in r.confidence)
    assert seps[3000] > 0.5 * seps[100]


def test_updates_that_drift_are_solved_in_chunks_and_tracked_per_chunk() -> None:
    # 12 clients, 240 rounds; every 80 rounds every update changes (as Lam et al.'s
    # test_recover_grad).
    rng = np.random.default_rng(3)
    p = (rng.random((240, 12)) < 0.5).astype(np.int64)
    base = rng.normal(1, 0.1, size=(12, 50))
    periods = [base + rng.normal(0, 0.3, size=base.shape) for _ in range(3)]
    sums = np.concatenate([p[80 * i : 80 * (i + 1)] @ periods[i] for i in range(3)])
    r = disaggregate(sums, window_counts(p, 10), 10, workers=2)
    assert r.chunks == [(0, 80), (80, 160), (160, 240)]  # chosen from the spectrum: exact chunks
    assert np.array_equal(r.participation, p) and r.certain.all()
    for i in range(3):
        np.testing.assert_allclose(r.chunk_updates[i], periods[i], atol=1e-8)
    np.testing.assert_allclose(r.updates, np.mean(periods, axis=0), atol=1e-8)
    # Solved as one span the sums have no 12-dimensional column space: nothing may come back
    # certain.
    whole = disaggregate(sums, window_counts(p, 10), 10, chunk=0, workers=2)
    wrong = [k for k in range(12) if not np.array_equal(whole.participation[:, k], p[:, k])]
    assert wrong and not any(whole.certain[k] for k in wrong)


def test_per_client_intervals_of_any_shape(tmp_path) -> None:
    p, u, sums = _case(n=6, t=80, d=40, seed=6)
    rng = np.random.default_rng(0)
    rows = []
    for k in range(6):  # each client its own intervals: random cut points, some rounds uncounted
        cuts = np.sort(rng.choice(np.arange(5, 75), size=5, replace=False))
        edges = [0, *cuts.tolist(), 80]
        for a, b in zip(edges, edges[1:]):
            if rng.random() < 0.85:
                rows.append((k, a, b, int(p[a:b, k].sum())))
    table = tmp_path / "counts.csv"
    table.write_text(
        "client,start,end,count\n" + "".join(f"{k},{a},{b},{c}\n" for k, a, b, c in rows)
    )
    plog = ParticipationLog.load(table, rounds=80)
    assert [
        (k, iv.start, iv.end, iv.count) for k, ivs in enumerate(plog.intervals) for iv in ivs
    ] == sorted(rows)
    assert any(
        sum(iv.end - iv.start for iv in ivs) < 80 for ivs in plog.intervals
    )  # some rounds uncounted
    r = disaggregate(sums, plog, workers=2)
    assert np.array_equal(r.participation, p)
    np.testing.assert_allclose(r.updates, u, atol=1e-8)
    arrays = tmp_path / "counts.npz"
    np.savez(
        arrays,
        **{
            name: np.array([row[i] for row in rows])
            for i, name in enumerate(("client", "start", "end", "count"))
        },
    )
    assert ParticipationLog.load(arrays, rounds=80) == plog
    with pytest.raises(IllPosed, match=r"client 2: intervals 3-9 and 8-11 overlap"):
        ParticipationLog(20, ((), (), (Interval(3, 10, 2), Interval(8, 12, 1))))


def test_an_ambiguous_column_is_never_returned_as_certain() -> None:
    p, _, sums = _case(n=6, t=60, d=40, seed=2)
    # Two clients with the same counts in every window: the sums cannot say which column is whose.
    twin = p.copy()
    twin[:, 1] = twin[:, 0]
    twin[:10, 1] = np.roll(twin[:10, 0], 1)  # a different column with the same window counts
    sums = twin @ np.random.default_rng(1).normal(size=(6, 40))
    r = disaggregate(sums, window_counts(twin, 10), 10, workers=1)
    assert not r.certain[0] and not r.certain[1] and "has the same counts" in r.confidence[0].reason
    assert r.certain[2:].all()
    with pytest.raises(
        UncertainColumns, match=r"2 of 6 clients' columns are not certain: client 0:"
    ):
        disaggregate(sums, window_counts(twin, 10), 10, workers=1, on_uncertain="fail")


def test_noise_beyond_the_spectral_gap_flags_every_wrong_column() -> None:
    p, _, sums = _case(n=20, t=200, d=200, seed=0)
    noisy = sums + np.random.default_rng(1).normal(scale=2.0, size=sums.shape)
    r = disaggregate(noisy, window_counts(p, 10), 10, workers=2)
    wrong = [k for k in range(20) if not np.array_equal(r.participation[:, k], p[:, k])]
    assert wrong  # std 2: the recovery is no longer exact ...
    assert not any(r.certain[k] for k in wrong)  # ... and says so for every wrong client


def _slow_unless_first(job):  # noqa: ANN001
    import time as _time

    from gradleak.attacks.disaggregation import core

    if job[1] == 0:
        raise core.SolverFailure("client 0, rounds 0-59: HiGHS status 1: Time limit reached")
    _time.sleep(30)
    return job


def test_the_first_failure_stops_the_other_clients_at_once(monkeypatch) -> None:
    import time as _time

    from gradleak.attacks.disaggregation import core

    p, _, sums = _case(n=6, t=60, d=40)
    monkeypatch.setattr(core, "_column", _slow_unless_first, raising=True)
    start = _time.perf_counter()
    with pytest.raises(SolverFailure, match="client 0, rounds 0-59"):
        core._run_jobs([(0, k, 1, None) for k in range(6)], {"chunks": []}, 2, None)
    assert _time.perf_counter() - start < 15  # not after the other clients' 30 s each


def test_a_round_the_counts_leave_empty_must_sum_to_nothing() -> None:
    p, u, _ = _case()
    p[:10] = 0  # nobody took part in the first window: those sums are zero
    sums = p @ u
    r = disaggregate(sums, window_counts(p, 10), 10, workers=1)
    assert np.array_equal(r.participation[:10], np.zeros((10, 6)))
    loud = sums.copy()
    loud[3] = sums[20]  # a round the counts leave empty, with a sum as large as the others'
    with pytest.raises(
        IllPosed,
        match=r"^round 3: the counts leave no client a way to take part, yet its sum has norm",
    ):
        disaggregate(loud, window_counts(p, 10), 10, workers=1)
