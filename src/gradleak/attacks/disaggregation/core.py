"""Gradient disaggregation (Lam et al., ICML 2021): individual updates from secure sums.

Under secure aggregation the server sees, for each round t, only ``S_t = sum_k P[t, k] U_k``
(P the 0/1 participation matrix, U_k client k's update), plus how often each client took part in
some intervals of rounds (``ParticipationLog``), as a deployment's analytics give. The attack:

1. Chunks of rounds (``subspace.plan_chunks``, or a fixed length), each with the column space of
   its sums: the leading n left singular vectors (n: the clients that may take part in it).
2. Per client and chunk, its participation column: exact sums, the binary feasibility program in
   the column space (``programs.exact_program``); noisy sums, the local search of ``search``, then
   for clients it could not place (a residual far above the chunk's median) a search from the LP
   relaxation, then the L1 program. Clients run in parallel processes; the first failure stops
   them all.
3. Evidence per column: the runner-up, the best other count-feasible vector found, and how much
   worse it fits per round it changes, against what a change costs on exact sums
   (``Column.separation``). A client is *certain* when in every chunk the spectrum has a clear gap
   at n (``GAP_MAX``), the separation is at least ``separation``, and no other client has the same
   counts. Uncertain clients are reported (``on_uncertain="warn"``) or stop
   the attack (``"fail"``). This is evidence from the search, not a proof: an alternative the
   search did not reach is not ruled out, which is why a weak spectral gap alone denies certainty.
4. Each chunk's updates by least squares on its sums; a client's update is their mean over the
   chunks it took part in (all are reported).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import numpy as np

from gradleak.attacks.disaggregation.constraints import IllPosed, ParticipationLog
from gradleak.attacks.disaggregation.milp import check_solver, solve
from gradleak.attacks.disaggregation.programs import exact_program, l1_program, pivot_map
from gradleak.attacks.disaggregation.search import Column, ColumnSearch
from gradleak.attacks.disaggregation.subspace import (
    basis,
    even_chunks,
    gap_ratio,
    is_exact,
    plan_chunks,
)
from gradleak.errors import GradleakError

log = logging.getLogger("gradleak")

# A chunk whose gap ratio s[n]/s[n-1] is above this has no clear n-dimensional column space: its
# columns are never certain. (Measured: recovery exact at ratios up to 0.42; the FedAvg runs whose
# model trains between rounds, where the search returns wrong columns, at 0.90 and 0.95.)
GAP_MAX = 0.6
# The smallest Column.separation of a certain column. (Measured in benchmarks/disaggregation.py:
# wrong columns at 0.14 or less, at noise of std 2 and on FedAvg updates of a model that trains
# between rounds; right columns at 0.47 or more up to noise of std 1, on the original's test
# instances and on FedAvg updates of a frozen model, but down to 0.08 in the first rounds of the
# secure-sum chain config, which are then exact yet not certain: the rule errs that way.)
SEPARATION_MIN = 0.25
# Phase 2: a client whose residual is this many times the chunk's median gets the harder search.
OUTLIER = 4.0


class SolverFailure(GradleakError):
    """The solver did not prove a solution for a client: no matrix is returned."""


class UncertainColumns(GradleakError):
    """Some clients' columns are not shown to be unique (with ``on_uncertain="fail"``)."""


@dataclass(frozen=True)
class Confidence:
    """The evidence for one client's recovered column, over all its chunks."""

    certain: bool
    separation: float  # smallest Column.separation over the chunks (inf: no alternative found)
    runner_up_distance: int  # rounds in which that runner-up differs
    gap_ratio: float  # largest s[n]/s[n-1] over the client's chunks
    methods: list[str]  # how each chunk's column was found
    reason: str = ""  # why it is not certain


@dataclass(frozen=True)
class Disaggregation:
    participation: np.ndarray  # T x n, 0/1
    updates: np.ndarray  # n x d: each client's mean over the chunks it took part in (NaN: none)
    chunk_updates: (
        np.ndarray
    )  # C x n x d: least squares per chunk (NaN where a client took no part)
    chunks: list[tuple[int, int]]  # rounds [start, end) of each chunk
    residuals: np.ndarray  # n: largest squared distance of a column to its chunk's column space
    singular_values: np.ndarray  # of the first chunk's sums
    confidence: list[Confidence] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def certain(self) -> np.ndarray:
        return np.array([c.certain for c in self.confidence], dtype=bool)

    def per_client(self) -> list[dict]:
        """One JSON-ready row per client: its verdict, the evidence, and how often it took part."""
        return [
            {
                "client": k,
                "certain": c.certain,
                "separation": c.separation if np.isfinite(c.separation) else None,
                "runner_up_distance": c.runner_up_distance,
                "gap_ratio": c.gap_ratio,
                "methods": c.methods,
                "residual": float(self.residuals[k]),
                "rounds_taken_part": int(self.participation[:, k].sum()),
                "reason": c.reason,
            }
            for k, c in enumerate(self.confidence)
        ]

    def save(self, out: Any) -> None:
        """``participation.csv``, ``updates.npz`` (``updates``, ``chunk_updates``, ``chunks``) and
        ``disaggregation.json`` (chunks, time, the spectrum's head, per-client evidence), written
        into ``out`` (a ``rundir.OwnedDir`` or ``SubDir``) atomically, the summary last."""
        from gradleak.safeio import npz_bytes

        text = io.StringIO()
        np.savetxt(text, self.participation, fmt="%d", delimiter=",")
        out.write_text("participation.csv", text.getvalue())
        out.write_bytes(
            "updates.npz",
            npz_bytes(
                updates=self.updates,
                chunk_updates=self.chunk_updates,
                chunks=np.array(self.chunks, dtype=np.int64),
            ),
        )
        t, n = self.participation.shape
        out.write_text(
            "disaggregation.json",
            json.dumps(
                {
                    "rounds": int(t),
                    "clients": int(n),
                    "chunks": [list(c) for c in self.chunks],
                    "seconds": self.seconds,
                    "certain_clients": int(self.certain.sum()),
                    "per_client": self.per_client(),
                    "singular_values": self.singular_values[: n + 5].tolist(),
                },
                indent=2,
            ),
        )


# -- the worker side -------------------------------------------------------------------------------

_STATE: dict | None = None  # this process's chunks, bases and constraints (set once per process)


def _use_state(state: dict) -> None:
    global _STATE
    _STATE = state
    try:  # one BLAS thread per worker: the parallelism is across clients
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass


def _column(job: tuple) -> tuple[int, int, Column]:
    """One (chunk, client) column. ``job``: (chunk index, column index, phase, previous column)."""
    assert _STATE is not None, "_use_state must run first"
    c, k, phase, previous = job
    st = _STATE
    chunk = st["chunks"][c]
    sub: ParticipationLog = chunk["log"]
    a_rows, counts = sub.matrix(k)
    gid, gcounts = sub.groups(k)
    search = ColumnSearch(chunk["q"], gid, gcounts)
    seed = 1000 * c + k
    name, (lo, hi) = st["names"][k], chunk["rounds"]
    limit = st["time_limit"]
    timed_out = f"the solver ran out of time ({limit:g} s): the column comes from the search alone"
    if chunk["exact"]:
        prog = exact_program(hi - lo, *chunk["pivots"], a_rows, counts)
        out = solve(prog, solver=st["solver"], time_limit=st["time_limit"])
        if out.x is None and out.timed_out:  # no proof either way: the search's best, not certain
            col = search.solve(starts=st["starts"], seed=seed, a_rows=a_rows, counts=counts)
            return c, k, replace(col, note=timed_out)
        if out.x is None:
            raise SolverFailure(f"client {name}, rounds {lo}-{hi - 1}: {out.status}")
        given = ("exact-milp", np.round(out.x).astype(np.int64))
        return (
            c,
            k,
            search.solve(starts=st["starts"], seed=seed, a_rows=a_rows, counts=counts, given=given),
        )
    if phase == 1:
        return c, k, search.solve(starts=st["starts"], seed=seed, a_rows=a_rows, counts=counts)
    # phase 2: a client the search could not place: the LP start and more starts, then the L1
    # program
    col = search.solve(
        starts=4 * st["starts"],
        seed=seed + 1,
        a_rows=a_rows,
        counts=counts,
        lp=True,
        given=(previous.method, previous.p),
    )
    if col.residual > st["outlier"][c]:
        out = solve(
            l1_program(chunk["q"], a_rows, counts), solver=st["solver"], time_limit=st["time_limit"]
        )
        if out.x is not None:
            given = ("l1-milp", np.round(out.x[: hi - lo]).astype(np.int64))
            col = search.solve(
                starts=st["starts"], seed=seed + 2, a_rows=a_rows, counts=counts, given=given
            )
        elif out.timed_out:
            col = replace(col, note=timed_out)
    return c, k, col


def _run_jobs(
    jobs: list[tuple],
    state: dict,
    workers: int,
    progress: Callable[[int, int], None] | None,
    done: Callable[[tuple[int, int, Column]], None] | None = None,
) -> list[tuple[int, int, Column]]:
    """Run the jobs, in worker processes when ``workers > 1``, handing each result to ``done`` as
    it arrives; the first failure stops them all."""
    out: list[tuple[int, int, Column]] = []

    def arrived(res: tuple[int, int, Column]) -> None:
        out.append(res)
        if done:
            done(res)
        if progress:
            progress(len(out), len(jobs))

    if workers <= 1 or len(jobs) <= 1:
        _use_state(state)
        for job in jobs:
            arrived(_column(job))
        return out
    ctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context()
    pool = ctx.Pool(workers, initializer=_use_state, initargs=(state,))
    try:
        for res in pool.imap_unordered(_column, jobs):
            arrived(res)
    except BaseException:
        pool.terminate()  # stop the other clients now, not after their own time limits
        raise
    else:
        pool.close()
    finally:
        pool.join()
    return out


# -- the attack ----------------------------------------------------------------------------------


def _chunks(
    sums: np.ndarray, plog: ParticipationLog, chunk: int | None, step: int
) -> list[tuple[int, int]]:
    t = sums.shape[0]
    if chunk is None:
        return plan_chunks(sums, plog.clients, step)
    if chunk <= 0 or chunk >= t:
        return [(0, t)]
    return even_chunks(t, chunk, 1, chunk // 2)


def _step(plog: ParticipationLog) -> int:
    """The grain of chunk boundaries: the typical counted interval (the window, for windows)."""
    lengths = [iv.end - iv.start for ivs in plog.intervals for iv in ivs]
    return max(1, int(np.median(lengths))) if lengths else 1


def disaggregate(
    sums: np.ndarray,
    counts: np.ndarray | ParticipationLog,
    window: int | None = None,
    *,
    chunk: int | None = None,
    time_limit: float = 60.0,
    workers: int | None = None,
    client_ids: list | None = None,
    solver: str = "highs",
    separation: float = SEPARATION_MIN,
    on_uncertain: Literal["warn", "fail"] = "warn",
    starts: int = 8,
    only: list[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    journal: ColumnJournal | None = None,
) -> Disaggregation:
    """Recover the participation matrix and every client's update from round sums and counts.

    Args:
        sums: T x d, one row per round (the flattened sum of the round's updates).
        counts: a ``ParticipationLog``, or W x n counts per window of ``window`` rounds.
        window: rounds per window (with a count matrix).
        chunk: rounds per chunk; None chooses from the spectrum, 0 solves all rounds at once.
        time_limit: seconds a solver may spend on one client's program.
        workers: processes solving clients in parallel (default: the machine's cores).
        client_ids: the clients' names in messages (default: their column index).
        solver: "highs" (scipy, the default), "scip" or "gurobi" (when installed).
        separation: the smallest ``Column.separation`` of a certain column (0 to 1).
        on_uncertain: "warn" (report it) or "fail" (raise UncertainColumns).
        starts: random starts of the search per column (phase 2 uses four times as many).
        only: solve these columns only (e.g. to time large federations); the others stay 0 and
            no updates are computed.
        progress: called with (columns done, columns to do).
        journal: where each finished column is kept as it completes; columns it already holds
            for these same inputs are not solved again (a re-run continues).
    """
    start = time.perf_counter()
    check_solver(solver, key="solver")
    if on_uncertain not in ("warn", "fail"):
        raise GradleakError(f"on_uncertain must be 'warn' or 'fail', got {on_uncertain!r}")
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2:
        raise IllPosed(f"sums must be rounds x dimensions, got shape {sums.shape}")
    if not np.all(np.isfinite(sums)):
        raise IllPosed("the sums hold NaN or infinite values")
    t = sums.shape[0]
    plog = (
        counts
        if isinstance(counts, ParticipationLog)
        else ParticipationLog.from_windows(np.asarray(counts), window or 0, t)
        if window
        else None
    )
    if plog is None:
        raise IllPosed("a count matrix needs its window (rounds per window)")
    if plog.rounds != t:
        raise IllPosed(f"the participation log covers {plog.rounds} rounds, the sums {t}")
    n = plog.clients
    names = list(client_ids) if client_ids is not None else list(range(n))
    if t < n:
        raise IllPosed(f"{t} rounds for {n} clients: need at least as many rounds as clients")
    _check_empty_rounds(sums, plog)
    chunks = _chunks(sums, plog, chunk, _step(plog))
    todo = list(range(n)) if only is None else list(only)

    state, spectra = _chunk_state(sums, plog, chunks, n, names, solver, time_limit, starts)
    workers = max(1, min(workers or os.cpu_count() or 1, n * len(chunks)))
    log.info(
        "disaggregating %d rounds of %d clients in %d chunk(s) of %s rounds, %d worker(s)",
        t,
        n,
        len(chunks),
        "/".join(str(b - a) for a, b in chunks[:3]),
        workers,
    )
    fingerprint = _fingerprint(sums, plog, chunks, solver, time_limit, starts, todo)
    columns = _solve_columns(state, todo, workers, progress, journal, fingerprint)
    participation = np.zeros((t, n), dtype=np.int64)
    for (c, k), col in columns.items():
        lo, hi = chunks[c]
        participation[lo:hi, k] = col.p
    confidence = _confidence(state, columns, n, todo, separation, names)
    chunk_updates = _chunk_updates(state, sums, participation) if only is None else None
    if chunk_updates is None:
        chunk_updates = np.full((len(chunks), n, sums.shape[1]), np.nan)
    with np.errstate(invalid="ignore"):
        updates = np.nanmean(chunk_updates, axis=0) if len(chunks) > 1 else chunk_updates[0]
    residuals = np.zeros(n)
    for (c, k), col in columns.items():
        residuals[k] = max(residuals[k], col.residual)
    result = Disaggregation(
        participation,
        updates,
        chunk_updates,
        chunks,
        residuals,
        spectra[0],
        confidence,
        time.perf_counter() - start,
    )
    _verdict(confidence, names, todo, on_uncertain)
    return result


def _chunk_state(
    sums: np.ndarray,
    plog: ParticipationLog,
    chunks: list[tuple[int, int]],
    n: int,
    names: list,
    solver: str,
    time_limit: float,
    starts: int,
) -> tuple[dict, list]:
    """Per chunk: the clients that may take part, the sums' basis, exactness and gap (what the
    workers solve from), and each chunk's spectrum; a chunk whose sums cannot identify its
    clients is refused (IllPosed)."""
    state: dict = {
        "names": names,
        "solver": solver,
        "time_limit": time_limit,
        "starts": starts,
        "chunks": [],
        "outlier": {},
    }
    spectra = []
    for lo, hi in chunks:
        sub = plog.within(lo, hi)
        active = [k for k in range(n) if not sub.known_absent(k)]
        if hi - lo < len(active):
            raise IllPosed(
                f"rounds {lo}-{hi - 1}: {hi - lo} rounds for {len(active)} clients that may take "
                "part"
            )
        q, s = basis(sums[lo:hi], len(active))
        spectra.append(s)
        m = len(active)
        if m and (len(s) < m or s[m - 1] <= 1e-8 * s[0]):
            raise IllPosed(
                f"rounds {lo}-{hi - 1}: the sums have rank below {m} (singular value {m}: "
                f"{s[m - 1] if len(s) >= m else 0:.3g}, largest {s[0]:.3g}): some clients' "
                "participation is not identifiable"
            )
        exact = is_exact(s, m)
        state["chunks"].append(
            {
                "rounds": (lo, hi),
                "log": sub,
                "q": q,
                "active": active,
                "exact": exact,
                "gap": 0.0 if exact else gap_ratio(s, m),
                "pivots": pivot_map(q) if exact and m else None,
            }
        )
    return state, spectra


def _solve_columns(
    state: dict,
    todo: list[int],
    workers: int,
    progress: Callable[[int, int], None] | None,
    journal: ColumnJournal | None,
    fingerprint: str,
) -> dict[tuple[int, int], Column]:
    """Every (chunk, client) column: phase 1 for all, phase 2 (the harder search) for clients far
    above their chunk's median residual; columns the journal already holds are not solved again,
    new ones are added to it as they arrive."""
    kept: dict[tuple[int, int, int], Column] = (
        journal.open(fingerprint) if journal is not None else {}
    )

    def run(jobs: list[tuple], phase: int, shown: Callable[[int, int], None] | None) -> dict:
        done = {(c, k): kept[(c, k, phase)] for c, k, _, _ in jobs if (c, k, phase) in kept}
        fresh = [j for j in jobs if (j[0], j[1], phase) not in kept]
        record = None if journal is None else (lambda r: journal.add(phase, r))
        done.update({(c, k): col for c, k, col in _run_jobs(fresh, state, workers, shown, record)})
        return done

    jobs = [
        (c, k, 1, None) for c, ch in enumerate(state["chunks"]) for k in ch["active"] if k in todo
    ]
    if any((c, k, 1) in kept for c, k, _, _ in jobs):
        log.info(
            "continuing: %d of %d columns already solved",
            sum((c, k, 1) in kept for c, k, _, _ in jobs),
            len(jobs),
        )
    columns = run(jobs, 1, progress)
    retry = []
    for c, ch in enumerate(state["chunks"]):
        res = [columns[(c, k)].residual for k in ch["active"] if (c, k) in columns]
        if ch["exact"] or not res:
            continue
        state["outlier"][c] = OUTLIER * float(np.median(res))
        retry += [
            (c, k, 2, columns[(c, k)])
            for k in ch["active"]
            if (c, k) in columns and columns[(c, k)].residual > state["outlier"][c]
        ]
    if retry:
        log.info(
            "searching harder for %d column(s) far from their chunk's column space", len(retry)
        )
        columns.update(run(retry, 2, None))
    return columns


def _chunk_updates(state: dict, sums: np.ndarray, participation: np.ndarray) -> np.ndarray:
    """C x n x d: each chunk's updates by least squares on its sums (NaN where a client took no
    part)."""
    n = participation.shape[1]
    out = np.full((len(state["chunks"]), n, sums.shape[1]), np.nan)
    for c, ch in enumerate(state["chunks"]):
        lo, hi = ch["rounds"]
        act = [k for k in ch["active"] if participation[lo:hi, k].any()]
        if act:
            out[c, act] = np.linalg.lstsq(
                participation[lo:hi, act].astype(np.float64), sums[lo:hi], rcond=None
            )[0]
    return out


def _verdict(confidence: list[Confidence], names: list, todo: list[int], on_uncertain: str) -> None:
    """Warn of (or, with ``on_uncertain="fail"``, refuse) columns that are not certain."""
    uncertain = [
        (names[k], conf.reason)
        for k, conf in enumerate(confidence)
        if k in todo and not conf.certain
    ]
    if not uncertain:
        return
    text = "; ".join(f"client {name}: {why}" for name, why in uncertain[:5])
    more = f" (and {len(uncertain) - 5} more)" if len(uncertain) > 5 else ""
    if on_uncertain == "fail":
        raise UncertainColumns(
            f"{len(uncertain)} of {len(todo)} clients' columns are not certain: {text}{more}"
        )
    log.warning(
        "%d of %d clients' columns are not certain: %s%s", len(uncertain), len(todo), text, more
    )


def _fingerprint(
    sums: np.ndarray,
    plog: ParticipationLog,
    chunks: list,
    solver: str,
    time_limit: float,
    starts: int,
    todo: list[int],
) -> str:
    """What the columns depend on: a journal written for other inputs is not reused."""
    h = hashlib.sha256(np.ascontiguousarray(sums).tobytes())
    h.update(repr((plog, chunks, solver, float(time_limit), starts, todo)).encode())
    return h.hexdigest()


class ColumnJournal:
    """Finished columns, one JSON line each as it completes, in a file of an owned directory
    (``owner``: a ``rundir.OwnedDir`` or ``SubDir``; ``name``: the file). The first line is the
    inputs' fingerprint: a journal of other inputs is started afresh."""

    def __init__(self, owner: Any, name: str = "columns.jsonl") -> None:
        self.owner, self.name = owner, name

    def open(self, fingerprint: str) -> dict[tuple[int, int, int], Column]:
        """The columns kept for these inputs (chunk, client, phase) -> Column; a journal of other
        inputs, or a damaged one, is replaced by an empty one."""
        from gradleak.errors import DataError
        from gradleak.safeio import parse_json

        kept: dict[tuple[int, int, int], Column] = {}
        if self.owner.exists(self.name):
            try:
                data = self.owner.read_bytes(self.name, kind="rows")
                lines = data[: data.rfind(b"\n") + 1].splitlines()
                if lines and parse_json(lines[0], self.name) == {"fingerprint": fingerprint}:
                    for line in lines[1:]:
                        e = parse_json(line, self.name)
                        col = Column(
                            np.asarray(e["p"], dtype=np.int64),
                            float(e["residual"]),
                            float(e["runner_up"]),
                            int(e["runner_up_distance"]),
                            str(e["method"]),
                            float(e["flip_cost"]),
                            str(e["note"]),
                        )
                        kept[(int(e["chunk"]), int(e["client"]), int(e["phase"]))] = col
            except (DataError, KeyError, TypeError, ValueError):
                kept = {}
        lines = [json.dumps({"fingerprint": fingerprint})] + [
            self._line(key, col) for key, col in kept.items()
        ]
        self.owner.write_text(self.name, "".join(line + "\n" for line in lines))
        return kept

    @staticmethod
    def _line(key: tuple[int, int, int], col: Column) -> str:
        c, k, phase = key
        row = {**asdict(col), "p": col.p.tolist(), "chunk": c, "client": k, "phase": phase}
        return json.dumps(row)

    def add(self, phase: int, result: tuple[int, int, Column]) -> None:
        c, k, col = result
        self.owner.append(self.name, (self._line((c, k, phase), col) + "\n").encode())


def _check_empty_rounds(sums: np.ndarray, plog: ParticipationLog) -> None:
    """A round the counts leave empty must sum to (about) nothing: a sum as large as half the
    median of the other rounds' means the counts do not belong to these sums."""
    empty = plog.empty_rounds()
    if not empty.any():
        return
    norms = np.linalg.norm(sums, axis=1)
    scale = float(np.median(norms[~empty])) if (~empty).any() else 0.0
    loud = np.flatnonzero(empty & (norms > max(0.5 * scale, 1e-12 * float(norms.max()))))
    if len(loud):
        r = int(loud[0])
        raise IllPosed(
            f"round {r}: the counts leave no client a way to take part, yet its sum has norm "
            f"{norms[r]:.3g} (the other rounds' median: {scale:.3g}); the counts do not belong to "
            "these sums"
        )


def _confidence(
    state: dict, columns: dict, n: int, todo: list[int], separation: float, names: list
) -> list[Confidence]:
    """Each client's evidence over its chunks, and the verdict."""
    out = []
    for k in range(n):
        mine = [(c, columns[(c, k)]) for c in range(len(state["chunks"])) if (c, k) in columns]
        if k not in todo:
            out.append(Confidence(False, float("nan"), 0, 0.0, [], "not solved (only)"))
            continue
        if not mine:  # its counts are 0 in every round: it never took part
            out.append(Confidence(True, float("inf"), 0, 0.0, ["counts"]))
            continue
        reasons = []
        for c, col in mine:
            ch = state["chunks"][c]
            lo, hi = ch["rounds"]
            where = f"rounds {lo}-{hi - 1}"
            if ch["gap"] > GAP_MAX:
                reasons.append(
                    f"{where}: no clear column space (gap ratio {ch['gap']:.2f} > {GAP_MAX})"
                )
            elif col.separation < separation:
                reasons.append(
                    f"{where}: a vector {col.runner_up_distance} rounds away fits almost as "
                    f"well (separation {col.separation:.2f} < {separation})"
                )
            elif c in state["outlier"] and col.residual > state["outlier"][c]:
                reasons.append(
                    f"{where}: its column is {col.residual:.3g} from the column space, far above "
                    "the other clients'"
                )
            if col.note:
                reasons.append(f"{where}: {col.note}")
            twins = [j for a, b in ch["log"].twins() for j in (a, b) if k in (a, b) and j != k]
            if twins:
                reasons.append(
                    f"{where}: client {names[twins[0]]} has the same counts (their columns can be "
                    "exchanged)"
                )
        worst = min(mine, key=lambda cc: cc[1].separation)[1]
        out.append(
            Confidence(
                certain=not reasons,
                separation=worst.separation,
                runner_up_distance=worst.runner_up_distance,
                gap_ratio=max(state["chunks"][c]["gap"] for c, _ in mine),
                methods=[col.method for _, col in mine],
                reason="; ".join(reasons),
            )
        )
    return out
