"""What the server knows of each client's participation: counts over intervals of rounds.

Device analytics report, per client, how often it took part in some intervals of rounds. Every
client may have its own intervals, of any length and position; rounds outside a client's
intervals are unconstrained for it. A client's intervals must not overlap (cumulative logs, such
as "taken part 7 times up to round 40", become intervals by differencing consecutive entries).

File layouts (``ParticipationLog.load``):

- a count matrix, W x n (CSV, or npz array ``counts``): client k took part ``counts[w, k]`` times
  in the w-th window of ``window`` rounds (the last window may be shorter);
- a table of intervals (CSV with the header ``client,start,end,count``, or npz arrays ``client``,
  ``start``, ``end``, ``count``): rounds ``start`` to ``end - 1`` counted from 0, ``client`` the
  column index from 0.
"""

from __future__ import annotations

import csv
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gradleak.errors import DataError, GradleakError


class IllPosed(GradleakError):
    """The sums and counts cannot determine the participation (detected before solving)."""


@dataclass(frozen=True)
class Interval:
    start: int  # first round, from 0
    end: int  # one past the last round
    count: int  # rounds of [start, end) the client took part in


@dataclass(frozen=True)
class ParticipationLog:
    """Per client, its counted intervals of rounds (sorted, non-overlapping)."""

    rounds: int
    intervals: tuple[tuple[Interval, ...], ...]

    @property
    def clients(self) -> int:
        return len(self.intervals)

    def __post_init__(self) -> None:
        for k, ivs in enumerate(self.intervals):
            for iv in ivs:
                if not 0 <= iv.start < iv.end <= self.rounds:
                    raise IllPosed(
                        f"client {k}: interval {iv.start}-{iv.end} is outside rounds "
                        f"0-{self.rounds}"
                    )
                if not 0 <= iv.count <= iv.end - iv.start:
                    raise IllPosed(
                        f"client {k}: a participation count of {iv.count} in rounds "
                        f"{iv.start}-{iv.end - 1} is negative or larger than its interval"
                    )
            for a, b in zip(ivs, ivs[1:]):
                if b.start < a.end:
                    raise IllPosed(
                        f"client {k}: intervals {a.start}-{a.end - 1} and {b.start}-{b.end - 1} "
                        "overlap (difference cumulative counts first)"
                    )

    # construction ----------------------------------------------------------------------------
    @classmethod
    def from_windows(cls, counts: np.ndarray, window: int, rounds: int) -> ParticipationLog:
        """Counts per window of ``window`` rounds (W x n), as in Lam et al.'s experiments."""
        counts = np.asarray(counts)
        w, n = counts.shape
        if w != -(-rounds // window):
            raise IllPosed(
                f"counts have {w} windows, but {rounds} rounds in windows of {window} make "
                f"{-(-rounds // window)}"
            )
        edges = [(s, min(s + window, rounds)) for s in range(0, rounds, window)]
        return cls(
            rounds,
            tuple(
                tuple(Interval(a, b, int(counts[i, k])) for i, (a, b) in enumerate(edges))
                for k in range(n)
            ),
        )

    @classmethod
    def from_rows(
        cls, rows: np.ndarray, rounds: int, clients: int | None = None
    ) -> ParticipationLog:
        """From an R x 4 table of (client, start, end, count)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != 4:
            raise DataError(
                "an interval table needs 4 columns (client, start, end, count), got shape "
                f"{rows.shape}"
            )
        if not np.all(np.isfinite(rows)) or not np.all(rows == np.round(rows)):
            raise DataError("an interval table holds whole numbers only")
        rows = rows.astype(np.int64)
        n = clients if clients is not None else int(rows[:, 0].max()) + 1 if len(rows) else 0
        if len(rows) and (rows[:, 0].min() < 0 or rows[:, 0].max() >= n):
            raise IllPosed(
                f"interval table names client {int(rows[:, 0].max())}, but there are {n} clients"
            )
        per: list[list[Interval]] = [[] for _ in range(n)]
        for c, a, b, k in rows.tolist():
            per[c].append(Interval(a, b, k))
        return cls(rounds, tuple(tuple(sorted(p, key=lambda iv: iv.start)) for p in per))

    @classmethod
    def load(cls, path: Path, rounds: int, window: int | None = None) -> ParticipationLog:
        """A count matrix (with ``window``) or an interval table (without), from CSV or npz."""
        from gradleak.safeio import load_npz, read_file

        if path.suffix.lower() == ".npz":
            f = load_npz(read_file(path, kind="tensors"), path)
            if not f:
                raise DataError(f"{path} holds no arrays")
            if {"client", "start", "end", "count"} <= set(f):
                table = np.stack(
                    [f[k].astype(np.float64) for k in ("client", "start", "end", "count")], 1
                )
                return cls._table(table, rounds, window, path)
            return cls._matrix(
                f["counts"] if "counts" in f else next(iter(f.values())), rounds, window, path
            )
        try:
            text = read_file(path, kind="rows").decode()
            first = text.split("\n", 1)[0]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # numpy's "input contained no data"
                if first.strip().replace(" ", "").lower().startswith("client,start,end,count"):
                    table = np.loadtxt(io.StringIO(text), delimiter=",", skiprows=1, ndmin=2)
                    return cls._table(table, rounds, window, path)
                return cls._matrix(
                    np.loadtxt(io.StringIO(text), delimiter=",", ndmin=2), rounds, window, path
                )
        except (ValueError, UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"{path} is not a numeric CSV: {exc}".replace("\n", " ")) from None

    @classmethod
    def _table(
        cls, table: np.ndarray, rounds: int, window: int | None, path: Path
    ) -> ParticipationLog:
        if window is not None:
            raise DataError(
                f"{path} is an interval table (client, start, end, count): leave out --window"
            )
        return cls.from_rows(table, rounds)

    @classmethod
    def _matrix(
        cls, counts: np.ndarray, rounds: int, window: int | None, path: Path
    ) -> ParticipationLog:
        if window is None:
            raise DataError(
                f"{path} is a count matrix (windows x clients): give --window, the rounds per "
                "window"
            )
        counts = np.asarray(counts, dtype=np.float64)
        if (
            counts.ndim != 2
            or not np.all(np.isfinite(counts))
            or not np.all(counts == np.round(counts))
        ):
            raise DataError(f"{path}: a count matrix holds whole numbers, windows x clients")
        return cls.from_windows(counts.astype(np.int64), window, rounds)

    # views -----------------------------------------------------------------------------------
    def within(self, lo: int, hi: int) -> ParticipationLog:
        """The intervals lying inside rounds [lo, hi), shifted to start at 0 (a chunk's view)."""
        return ParticipationLog(
            hi - lo,
            tuple(
                tuple(
                    Interval(iv.start - lo, iv.end - lo, iv.count)
                    for iv in ivs
                    if lo <= iv.start and iv.end <= hi
                )
                for ivs in self.intervals
            ),
        )

    def groups(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(group id per round, -1 where unconstrained; count per group) of client ``k``."""
        gid = np.full(self.rounds, -1, dtype=np.int64)
        counts = np.zeros(len(self.intervals[k]), dtype=np.int64)
        for g, iv in enumerate(self.intervals[k]):
            gid[iv.start : iv.end] = g
            counts[g] = iv.count
        return gid, counts

    def matrix(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(interval rows x rounds 0/1 matrix, counts) of client ``k``'s constraints."""
        ivs = self.intervals[k]
        a = np.zeros((len(ivs), self.rounds))
        for i, iv in enumerate(ivs):
            a[i, iv.start : iv.end] = 1
        return a, np.array([iv.count for iv in ivs], dtype=np.float64)

    def known_absent(self, k: int) -> bool:
        """Every round is counted for client ``k`` and every count is 0: it never took part."""
        ivs = self.intervals[k]
        covered = sum(iv.end - iv.start for iv in ivs)
        return covered == self.rounds and all(iv.count == 0 for iv in ivs)

    def empty_rounds(self) -> np.ndarray:
        """Rounds (a boolean mask) in which the log leaves no client a way to take part: every
        client's interval covering the round counts 0."""
        may = np.zeros(self.rounds, dtype=bool)
        for ivs in self.intervals:
            covered = np.zeros(self.rounds, dtype=bool)
            for iv in ivs:
                covered[iv.start : iv.end] = True
                if iv.count > 0:
                    may[iv.start : iv.end] = True
            may |= ~covered
        return ~may

    def twins(self) -> list[tuple[int, int]]:
        """Pairs of clients with identical constraints: their columns can be exchanged."""
        seen: dict[tuple[Interval, ...], int] = {}
        out = []
        for k, ivs in enumerate(self.intervals):
            if ivs in seen:
                out.append((seen[ivs], k))
            else:
                seen[ivs] = k
        return out


def window_counts(participation: np.ndarray, window: int) -> np.ndarray:
    """How often each client took part in each window of ``window`` rounds (W x n); the last
    window may be shorter."""
    t = participation.shape[0]
    return np.stack([participation[s : s + window].sum(0) for s in range(0, t, window)]).astype(
        np.int64
    )
