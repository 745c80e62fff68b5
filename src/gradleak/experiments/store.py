"""A run directory: the resolved config, append-only results, checkpoints, pending updates.

Layout::

    RUN/config.yaml                   the resolved config (every default filled in)
    RUN/results.jsonl                 one row per (round, client), appended as each finishes
    RUN/rounds.jsonl                  one row per round: participants, test accuracy and loss
    RUN/timings.jsonl                 wall-clock seconds per (round, client), kept apart so that
                                      results are bitwise reproducible
    RUN/checkpoints/global_RRRR.safetensors   the global model after round R (0 = initial)
    RUN/pending/round_RRRR/client_C.safetensors  updates of the round in progress
    RUN/secure_sum/round_RRRR.safetensors  under secure aggregation: the round's sum of updates,
                                      all that the server observes of the round
    RUN/disaggregation/               the disaggregation attack on those sums
    (experiments.secure_sum)
    RUN/audit/round_RRRR/client_C.{npz,png}  the audit's images
    RUN/report/                       the report
    RUN/run.log                       the log
    RUN/.gradleak                     the manifest: the directory is gradleak's, and these files are

Every file is read and written through ``rundir.OwnedDir`` (no links followed, regular files only,
sizes bounded, nothing deleted or overwritten that the manifest does not name). Crash safety: a
client's update is written (atomically) before its row, and a round's checkpoint before its round
row, so every row on disk can be trusted; a torn last line (kill -9 mid-write) is cut off when the
run resumes. What a resume reads back is checked against the model (names, shapes, dtypes, finite
values) and against the rows (each pending update's norm is its row's).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from gradleak.data.partition import ClientData
from gradleak.errors import DataError, GradleakError
from gradleak.fl.simulator import ClientResult, Hooks, RoundResult
from gradleak.fl.update import ClientUpdate, UpdateMismatch, check_state
from gradleak.rundir import OwnedDir
from gradleak.safeio import load_safetensors, parse_json, safetensors_bytes

log = logging.getLogger("gradleak")


# The JSON types of the row fields that readers rely on (``None`` where the field may be null);
# fields the filters add beyond these pass as they are.
_NUM, _INT, _BOOL, _STR = "number", "integer", "boolean", "string"
RESULT_FIELDS = {
    "round": _INT,
    "client": _INT,
    "num_samples": _INT,
    "batch_size": _INT,
    "lr": _NUM,
    "epochs": _INT,
    "steps": _INT,
    "train_loss": _NUM,
    "update_norm": _NUM,
    "withheld": _BOOL,
    "audited": _BOOL,
    "rdlv": (_NUM, None),
    "ssim": (_NUM, None),
    "psnr": (_NUM, None),
    "mse": (_NUM, None),
    "label_accuracy": (_NUM, None),
    "label_strategy": (_STR, None),
    "attack_seconds": (_NUM, None),
}
ROUND_FIELDS = {
    "round": _INT,
    "clients": "list of integers",
    "aggregated": _INT,
    "test_accuracy": _NUM,
    "test_loss": _NUM,
    "checkpoint_sha256": _STR,  # of the round's checkpoint file, checked when it is read back
}
TIMING_FIELDS = {"round": _INT, "client": _INT, "seconds": _NUM}
# Where a field has a range, any file's rows keep to it.
# NaN passes (a diverged run's losses are NaN).
RANGES = {
    "round": (1, math.inf),
    "client": (1, math.inf),
    "num_samples": (1, math.inf),
    "batch_size": (1, math.inf),
    "aggregated": (0, math.inf),
    "test_accuracy": (0, 1),
    "label_accuracy": (0, 1),
    "test_loss": (0, math.inf),
    "train_loss": (0, math.inf),
    "update_norm": (0, math.inf),
    "seconds": (0, math.inf),
    "attack_seconds": (0, math.inf),
    "ssim": (-1, 1),
    "mse": (0, math.inf),
}


def _is(value: Any, kind: str | None) -> bool:
    if kind is None:
        return value is None
    if kind == _BOOL:
        return type(value) is bool
    if kind == _INT:
        return type(value) is int
    if kind == _NUM:
        return type(value) in (int, float)
    if kind == _STR:
        return type(value) is str
    return type(value) is list and all(type(v) is int for v in value)  # list of integers


def check_row(
    row: Any,
    fields: dict[str, Any],
    required: tuple[str, ...],
    ranges: dict[str, tuple[float, float]] | None = None,
) -> str | None:
    """What is wrong with one row (None: nothing): not an object, a required field missing, or a
    known field of the wrong type or outside its range (``ranges``, default ``RANGES``)."""
    ranges = RANGES if ranges is None else ranges
    if not isinstance(row, dict):
        return f"not a JSON object but {json.dumps(row)[:40]}"
    for key in required:
        if key not in row:
            return f"no {key!r} field"
    for key, kinds in fields.items():
        kinds = kinds if isinstance(kinds, tuple) else (kinds,)
        if key in row and not any(_is(row[key], k) for k in kinds):
            expected = " or ".join("null" if k is None else k for k in kinds)
            return f"{key!r} is {json.dumps(row[key])[:40]}, not {expected}"
        low, high = ranges.get(key, (-math.inf, math.inf))
        value = row.get(key)
        if (
            key in ranges
            and value is not None
            and not low <= value <= high
            and not math.isnan(value)
        ):
            return f"{key!r} is {row[key]}, outside [{low}, {high}]"
    return None


class JsonLines:
    """An append-only JSON-lines file of an owned directory, synced after every row.

    ``fields`` and ``required`` describe its rows (``check_row``), ``key`` the fields that
    identify a row (the first never decreasing: rounds are appended in order): reading a damaged
    file (undecodable, a row of the wrong shape, a row repeated or out of order) raises one
    ``DataError`` naming the file and line, never a wrong table.
    """

    def __init__(
        self,
        owner: OwnedDir,
        rel: str,
        fields: dict[str, Any] | None = None,
        required: tuple[str, ...] = (),
        key: tuple[str, ...] = (),
        ranges: dict[str, tuple[float, float]] | None = None,
    ) -> None:
        self.owner, self.rel = owner, rel
        self.path = owner.path(rel)
        self.fields, self.required, self.key = fields or {}, required, key
        self.ranges = ranges

    def append(self, row: dict[str, Any]) -> None:
        self.owner.append(self.rel, (json.dumps(row) + "\n").encode())

    def _data(self) -> bytes:
        return self.owner.read_bytes(self.rel, kind="rows") if self.owner.exists(self.rel) else b""

    def read(self) -> list[dict[str, Any]]:
        """The complete rows: a torn last line (no trailing newline, left by a killed writer) is
        not a row, so every reader sees what a repair would keep."""
        data = self._data()
        data = data[: data.rfind(b"\n") + 1]
        rows: list[dict[str, Any]] = []
        seen = set()
        for i, line in enumerate(data.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                row = parse_json(line, f"{self.path}, line {i}")
            except DataError:
                problem: str | None = "not a JSON row"
            else:
                problem = check_row(row, self.fields, self.required, self.ranges)
            if problem is None and self.key:
                ident = tuple(row[k] for k in self.key)
                if ident in seen or (rows and ident[0] < rows[-1][self.key[0]]):
                    named = ", ".join(f"{k} {v}" for k, v in zip(self.key, ident, strict=True))
                    problem = f"{named} repeated or out of order"
                seen.add(ident)
            if problem:
                raise DataError(f"{self.path}, line {i}: {problem}; the run directory is damaged")
            rows.append(row)
        return rows

    def repair(self) -> None:
        """Cut a torn last line (atomically: a kill during the repair leaves the old file or the
        new one, never an emptied one)."""
        data = self._data()
        if data and not data.endswith(b"\n"):
            self.owner.write_bytes(self.rel, data[: data.rfind(b"\n") + 1])

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        self.owner.write_bytes(self.rel, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _checkpoint(round: int) -> str:
    return f"checkpoints/global_{round:04d}.safetensors"


_CHECKPOINT = re.compile(r"checkpoints/global_(\d{4,})\.safetensors")


def _pending(round: int, client: int) -> str:
    return f"pending/round_{round:04d}/client_{client}.safetensors"


def _same_norm(a: float, b: Any) -> bool:
    """Whether a norm recomputed from a saved update is its row's (threads may change the last
    bits)."""
    if not isinstance(b, int | float):
        return False
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):  # inf - x <= 1e-9 x inf would hold for any x
        return a == b
    return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b))


class RunStore:
    """Reads and writes one run directory (an ``OwnedDir`` of kind ``run``)."""

    def __init__(self, root: Path | OwnedDir) -> None:
        self.dir = root if isinstance(root, OwnedDir) else OwnedDir(Path(root), "run")
        self.root = self.dir.root
        d = self.dir
        self.results = JsonLines(
            d, "results.jsonl", RESULT_FIELDS, ClientResult.BASE_KEYS, ("round", "client")
        )
        required = tuple(k for k in ROUND_FIELDS if k != "checkpoint_sha256")  # older runs lack it
        self.rounds = JsonLines(d, "rounds.jsonl", ROUND_FIELDS, required, ("round",))
        self.timings = JsonLines(d, "timings.jsonl", TIMING_FIELDS, tuple(TIMING_FIELDS))
        self.checkpoints = self.root / "checkpoints"
        self.pending = self.root / "pending"
        self.config_path = self.root / "config.yaml"

    def claim(self) -> RunStore:
        """Make the directory this run's for writing (``OwnedDir.claim``)."""
        self.dir.claim()
        return self

    def exists(self) -> bool:
        return self.dir.exists("config.yaml")

    def lock(self) -> int:
        """Take the directory's exclusive lock (``RUN/.lock``) for this process and return its file
        descriptor (``unlock`` releases it); refuse when another process holds it."""
        return self.dir.lock()

    @staticmethod
    def unlock(fd: int) -> None:
        OwnedDir.unlock(fd)

    # config ---------------------------------------------------------------------------------
    def write_config(self, resolved: dict[str, Any]) -> None:
        self.dir.write_text("config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    def read_config(self) -> dict[str, Any]:
        """The resolved config as written, checked to be an experiment config (read as YAML without
        aliases or object tags); a damaged file is one ``DataError``."""
        from gradleak.experiments.config import parse_yaml, validate_config

        damaged = f"{self.config_path}: %s; the run directory is damaged"
        try:
            config = parse_yaml(self.dir.read_bytes("config.yaml", kind="config").decode())
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise DataError(damaged % f"not a readable YAML file ({problem})") from None
        if not isinstance(config, dict) or not isinstance(config.get("data"), dict):
            raise DataError(damaged % "not a config (a YAML mapping with a data: section)")
        # The data section is checked as written, not validated: its paths need not exist any more
        # (a run stays readable after its data has moved), and a file cut short inside it loses
        # the sections after it, which the comparison below finds.
        try:
            resolved = validate_config({**config, "data": {"source": "digits"}}).resolved()
        except GradleakError as exc:
            raise DataError(damaged % f"not an experiment config ({exc})") from None
        resolved["data"] = config["data"]
        if resolved != config:  # the run wrote every key: one missing or changed means damage
            from gradleak.experiments.config import first_difference

            raise DataError(
                damaged % "not the resolved config gradleak wrote (at "
                f"{first_difference(resolved, config)})"
            )
        return config

    # tensors ------------------------------------------------------------------------------------
    def _save_tensors(self, rel: str, tensors: dict[str, torch.Tensor]) -> None:
        self.dir.write_bytes(rel, safetensors_bytes(tensors))

    def _load_tensors(self, rel: str) -> dict[str, torch.Tensor]:
        return load_safetensors(self.dir.read_bytes(rel, kind="tensors"), self.dir.path(rel))[0]

    # checkpoints ----------------------------------------------------------------------------
    def checkpoint_path(self, round: int) -> Path:
        return self.dir.path(_checkpoint(round))

    def has_checkpoint(self, round: int) -> bool:
        return self.dir.exists(_checkpoint(round))

    def save_checkpoint(self, round: int, state: dict[str, torch.Tensor]) -> None:
        self._save_tensors(_checkpoint(round), state)

    def load_checkpoint(
        self, round: int, reference: dict[str, torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """The global model after ``round``, its bytes checked against the digest its round's row
        recorded (a flipped bit is caught even where it leaves the values finite); with
        ``reference`` (the model's state dict) every tensor is checked against it: names, shapes,
        dtypes, and finite values unless the round's row records a non-finite test loss (a
        diverged run's model is legitimately NaN)."""
        rel = _checkpoint(round)
        data = self.dir.read_bytes(rel, kind="tensors")
        rows = [r for r in self.rounds.read() if r["round"] == round]
        recorded = rows[0].get("checkpoint_sha256") if rows else None
        if recorded is not None and hashlib.sha256(data).hexdigest() != recorded:
            raise DataError(
                f"{self.dir.path(rel)} is not the checkpoint written after round {round} (its "
                "digest differs from the one in rounds.jsonl); the run directory is damaged"
            )
        state = load_safetensors(data, self.dir.path(rel))[0]
        if reference is not None:
            diverged = bool(rows) and not math.isfinite(rows[0]["test_loss"])
            try:
                check_state(
                    reference,
                    state,
                    str(self.checkpoint_path(round)),
                    exact_dtypes=True,
                    finite=not diverged,
                )
            except UpdateMismatch as exc:
                raise DataError(f"{exc}; the run directory is damaged") from None
        return state

    def prune_checkpoints(self, latest: int, keep_every: int) -> None:
        """Keep the initial model, the latest, and every ``keep_every``-th round."""
        for rel in self.dir.listed("checkpoints/"):
            m = _CHECKPOINT.fullmatch(rel)
            if m is None:
                continue
            r = int(m.group(1))
            if r in (0, latest) or (keep_every and r % keep_every == 0):
                continue
            self.dir.remove(rel)

    def load_secure_sums(self) -> list[dict[str, torch.Tensor]]:
        """The recorded round sums, round 1 first (empty dicts for rounds with nothing summed)."""
        rounds = len(self.rounds.read())
        return [
            self._load_tensors(f"secure_sum/round_{r:04d}.safetensors")
            for r in range(1, rounds + 1)
        ]

    # rows and pending updates ---------------------------------------------------------------
    def record_client(self, result: ClientResult) -> None:
        m = result.update.meta
        self.dir.write_bytes(_pending(m.round, m.client_id), result.update.to_bytes())
        # the timing row first: a kill between the two leaves a timing row without its result
        # row, which resume_point drops (the client runs again), never a result without timing
        self.timings.append({"round": m.round, "client": m.client_id, "seconds": result.seconds})
        self.results.append(result.row())

    def record_round(
        self,
        row: dict[str, Any],
        state: dict[str, torch.Tensor],
        keep_every: int,
        observed: dict[str, torch.Tensor] | None = None,
    ) -> None:
        r = row["round"]
        if observed is not None:
            self._save_tensors(f"secure_sum/round_{r:04d}.safetensors", observed)
        data = safetensors_bytes(state)
        self.dir.write_bytes(_checkpoint(r), data)
        self.rounds.append({**row, "checkpoint_sha256": hashlib.sha256(data).hexdigest()})
        self.dir.remove_tree(f"pending/round_{r:04d}")
        self.dir.remove_dir("pending")
        self.prune_checkpoints(r, keep_every)

    def read_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(round rows, result rows), checked against each other: a finished round has exactly one
        result row per participant, and no result row belongs to a round beyond the one in progress.
        Anything else (rows lost or added by hand) is a ``DataError``."""
        rounds, results = self.rounds.read(), self.results.read()
        last = rounds[-1]["round"] if rounds else 0
        by_round: dict[int, list[int]] = {}
        for row in results:
            by_round.setdefault(row["round"], []).append(row["client"])
        for r in rounds:
            if sorted(by_round.get(r["round"], [])) != sorted(r["clients"]):
                raise DataError(
                    f"{self.results.path}: the rows of round {r['round']} are not those of its "
                    f"participants {r['clients']} ({self.rounds.path}); the run directory is "
                    "damaged"
                )
        beyond = [
            r
            for r in by_round
            if r > last + 1 or (r <= last and r not in {x["round"] for x in rounds})
        ]
        if beyond:
            raise DataError(
                f"{self.results.path}: rows of round {beyond[0]}, which {self.rounds.path} does "
                "not "
                "finish or continue; the run directory is damaged"
            )
        return rounds, results

    def _load_pending(
        self, row: dict[str, Any], reference: dict[str, torch.Tensor] | None
    ) -> ClientUpdate:
        """A finished client's saved update, checked against the model and against its row."""
        rel = _pending(row["round"], row["client"])
        where = self.dir.path(rel)
        update = ClientUpdate.from_bytes(self.dir.read_bytes(rel, kind="tensors"), where)
        m = update.meta
        if (m.round, m.client_id) != (row["round"], row["client"]):
            raise DataError(
                f"{where}: holds the update of round {m.round}, client {m.client_id}; the run "
                "directory is damaged"
            )
        if reference is None or (
            not update.delta and row["withheld"]
        ):  # withheld on an engine: no tensors sent
            return update
        norm = update.l2_norm()
        try:
            check_state(
                reference, update.delta, str(where), exact_dtypes=True, finite=math.isfinite(norm)
            )
        except UpdateMismatch as exc:
            raise DataError(f"{exc}; the run directory is damaged") from None
        if not _same_norm(norm, row["update_norm"]):
            raise DataError(
                f"{where}: its norm {norm:.6g} is not its row's update_norm {row['update_norm']!r} "
                f"({self.results.path}); the run directory is damaged"
            )
        return update

    def resume_point(
        self, partial: bool = True, reference: dict[str, torch.Tensor] | None = None
    ) -> tuple[int, dict[int, ClientResult]]:
        """(last finished round, results already finished in the round after it).

        Repairs torn lines and drops result rows that have no saved update (none in normal
        operation: the update is written first), so that no finished row is lost or repeated.
        ``partial=False`` (rounds that must run whole, as under SecAgg+) drops the unfinished
        round's rows too, so that it is run again from its start. With ``reference`` (the
        model's state dict) every reused update is checked (``_load_pending``).
        """
        for f in (self.results, self.rounds, self.timings):
            f.repair()
        rounds, rows = self.read_rows()
        last = rounds[-1]["round"] if rounds else 0
        if not self.has_checkpoint(last):
            raise GradleakError(
                f"{self.root}: checkpoint of round {last} is missing; cannot resume"
            )
        done, kept = {}, []
        for row in rows:
            if row["round"] <= last:
                kept.append(row)
                continue
            rel = _pending(row["round"], row["client"])
            if partial and row["round"] == last + 1 and self.dir.exists(rel):
                done[row["client"]] = ClientResult.from_row(row, self._load_pending(row, reference))
                kept.append(row)
        if len(kept) != len(rows):
            self.results.rewrite(kept)
        finished = {(r["round"], r["client"]) for r in kept}
        timings = self.timings.read()
        # one timing row per kept result: drop those of clients that will run again
        latest = {(t["round"], t["client"]): i for i, t in enumerate(timings)}
        timed = [
            t
            for i, t in enumerate(timings)
            if (key := (t["round"], t["client"])) in finished and latest[key] == i
        ]
        if len(timed) != len(timings):
            self.timings.rewrite(timed)
        self.clean(last, keep_next=partial)
        return last, done

    def clean(self, last: int, keep_next: bool = True) -> None:
        """Remove what a killed run leaves behind (only what the manifest names): temporary files,
        and pending updates of any round but the one being resumed (of every round unless
        ``keep_next``)."""
        for rel in self.dir.listed():
            if rel.endswith(".tmp"):
                self.dir.remove(rel)
        keep = f"pending/round_{last + 1:04d}/" if keep_next else None
        for rel in sorted(
            {
                "/".join(p.split("/")[:2])
                for p in self.dir.owned
                if p.startswith("pending/") and p != "pending/"
            }
        ):
            if keep is None or not keep.startswith(rel + "/"):
                self.dir.remove_tree(rel)
        self.dir.remove_dir("pending")


class StoreHooks:
    """Records every client and round in the run store (and passes them on to a display)."""

    def __init__(self, store: RunStore, keep_every: int, display: Hooks | None) -> None:
        self.store, self.keep_every, self.display = store, keep_every, display

    def round_started(self, round: int, clients: Sequence[ClientData]) -> None:
        if self.display:
            self.display.round_started(round, clients)

    def client_done(self, result: ClientResult) -> None:
        self.store.record_client(result)
        m = result.update.meta
        log.debug("round %d client %d: loss %.4f", m.round, m.client_id, result.train_loss)
        if self.display:
            self.display.client_done(result)

    def round_done(self, result: RoundResult, state: dict[str, torch.Tensor]) -> None:
        self.store.record_round(result.row(), state, self.keep_every, result.observed)
        log.info(
            "round %d: test accuracy %.4f, loss %.4f (%d/%d updates aggregated)",
            result.round,
            result.test_accuracy,
            result.test_loss,
            result.aggregated,
            len(result.clients),
        )
        if self.display:
            self.display.round_done(result, state)
